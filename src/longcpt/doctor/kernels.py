"""Kernel checks: every document-attention backend the device has, against a dense reference.

For each backend (`flash_attn`, `varlen`, `flex`, `sdpa`: what `available_backends` lists for
the device) and each 16-bit dtype, forward and backward at a few shapes (multi-head, GQA, with a
1-token document and a long one in every row) are compared with a dense float64 reference run on
the CPU from the same rounded inputs:

    error = max |kernel - reference| / max |reference|     (outputs, and dq, dk, dv)
    tolerance = 8 x the dtype's machine epsilon (bf16: 8 x 2^-7 = 6.2e-2, fp16: 8 x 2^-10 = 7.8e-3)

Measured on a CPU with the SDPA path: at most 0.8 eps (gradients, GQA). A mask that leaks across
documents or drops a token is off by O(1). FlexAttention has no backward on CPU, so there
only its forward is checked.

`intra_doc` and `anchor` share that kernel and differ in positions only, so they are checked
through a tiny model: loss and gradients on the device under bf16 autocast (what `bf16-mixed`
runs) against the float64 model on the CPU. Infini-attention's memory must stay float32 and
finite under bf16 autocast while streaming many segments.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longcpt.doctor.report import FAIL, PASS, SKIP, Result

SECTION = "kernels"
EPS_FACTOR = 8
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Model-level checks under bf16 autocast: relative loss error, and |g - g_ref| / |g_ref| over all
# parameter gradients. Measured on CPU: 5e-5 and 9e-3; a mask leaking across documents gives a
# gradient error of 1.1, intra_doc positions fed to anchor 0.15 (init std 0.05 keeps attention sharp
# enough for positions to matter).
MODEL_LOSS_TOL = 1e-2
MODEL_GRAD_TOL = 5e-2


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int


def shapes(device: torch.device, quick: bool) -> list[Shape]:
    """Multi-head and GQA shapes; longer on a GPU, shorter with --quick (the float64 reference on
    the CPU holds a (B, H, T, T) score matrix, which bounds T)."""
    t = 1024 if device.type == "cuda" else 256
    t = t // 4 if quick else t
    return [Shape("mha", 2, t // 2, 4, 4, 64), Shape("gqa", 1, t, 8, 2, 128)]


def document_lengths(seq_len: int, generator: torch.Generator) -> list[int]:
    """One row's documents: a long one, a 1-token one, then random lengths filling the row."""
    lens, left = [seq_len // 3, 1], seq_len - seq_len // 3 - 1
    while left:
        n = min(left, int(torch.randint(2, max(3, seq_len // 4), (1,), generator=generator)))
        lens.append(n)
        left -= n
    return lens


def cu_seqlens_of(rows: list[list[int]]) -> torch.Tensor:
    from longcpt.batch import cu_seqlens_for

    return cu_seqlens_for(rows)


def dense_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The reference: causal attention inside each document from an explicit (B, 1, T, T) mask.

    q (B, Hq, T, D), k/v (B, Hk, T, D); documents from `cu_seqlens` over the flattened B*T tokens.
    """
    b, _, t, _ = q.shape
    doc = torch.searchsorted(cu_seqlens[1:].long().cpu(), torch.arange(b * t), right=True).view(b, t)
    doc = doc.to(q.device)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    mask = (doc[:, None, :, None] == doc[:, None, None, :]) & causal  # (B, 1, T, T)
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.detach().double().cpu()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def kernel_errors(backend: str, dtype: torch.dtype, device: torch.device, shape: Shape, seed: int = 0,
                  backward: bool = True) -> dict[str, float]:
    """Relative errors of one backend at one shape: `out` and, with `backward`, `dq`, `dk`, `dv`."""
    from longcpt.model.attention.document import document_attention, document_layout

    g = torch.Generator().manual_seed(seed)
    rows = [document_lengths(shape.seq_len, g) for _ in range(shape.batch)]
    cu = cu_seqlens_of(rows)
    b, t, d = shape.batch, shape.seq_len, shape.head_dim
    base = [torch.randn(b, h, t, d, generator=g).to(dtype) for h in (shape.heads, shape.kv_heads, shape.kv_heads)]
    upstream = torch.randn(b, shape.heads, t, d, generator=g).to(dtype)

    ref_in = [x.double().requires_grad_(backward) for x in base]
    ref = dense_document_attention(*ref_in, cu)
    if backward:
        (ref * upstream.double()).sum().backward()

    xs = [x.to(device).requires_grad_(backward) for x in base]
    out = document_attention(*xs, document_layout(cu.to(device), b, t, device), backend=backend)
    errors = {"out": relative_error(out, ref.detach())}
    if backward:
        (out * upstream.to(device)).sum().backward()
        for name, x, r in zip(("dq", "dk", "dv"), xs, ref_in):
            errors[name] = relative_error(x.grad, r.grad)
    return errors


def check_backend(backend: str, dtype_name: str, device: torch.device, quick: bool) -> Result:
    """One backend in one dtype over every shape: the worst relative error against the tolerance."""
    dtype = DTYPES[dtype_name]
    backward = not (backend == "flex" and device.type != "cuda")  # no FlexAttention backward on CPU
    tol = EPS_FACTOR * torch.finfo(dtype).eps
    worst: dict[str, float] = {}
    per_shape = {}
    for shape in shapes(device, quick):
        errors = kernel_errors(backend, dtype, device, shape, backward=backward)
        per_shape[shape.name] = errors
        for k, v in errors.items():
            worst[k] = max(worst.get(k, 0.0), v)
    out_err = worst["out"]
    grad_err = max((v for k, v in worst.items() if k != "out"), default=None)
    names = "/".join(s.name for s in shapes(device, quick))
    line = f"{names}, 1-token docs: max error out {out_err:.1e}"
    line += f", grads {grad_err:.1e}" if grad_err is not None else " (forward only: no FlexAttention backward on CPU)"
    line += f" (tol {tol:.1e})"
    data = {"errors": per_shape, "tolerance": tol, "device": str(device)}
    bad = [k for k, v in worst.items() if not v <= tol]
    if bad:
        return Result(SECTION, f"{backend} {dtype_name}", FAIL, line + f": {', '.join(bad)} beyond tolerance; "
                      f"force another kernel with attention.backend=... and report this", data)
    return Result(SECTION, f"{backend} {dtype_name}", PASS, line, data)


def check_kernels(device: torch.device, quick: bool) -> Iterator[Result]:
    """Every backend usable on `device` in bf16 and fp16 (those that are not usable: a SKIP line)."""
    from longcpt.model.attention.document import BACKENDS, available_backends

    for dtype_name, dtype in DTYPES.items():
        usable = available_backends(device, dtype)
        for backend in usable:
            yield check_backend(backend, dtype_name, device, quick)
        missing = [b for b in BACKENDS if b not in usable and b != "auto"]
        if missing:
            why = "CUDA only" if device.type != "cuda" else "not usable on this GPU/dtype (see environment)"
            yield Result(SECTION, f"{'/'.join(missing)} {dtype_name}", SKIP, why)


# ----------------------------------------------------------------------------------------------
# Through a model: the document kinds' positions and rotation, and Infini's memory.


def tiny_args(kind: str, **options):
    from longcpt.model import ModelArgs

    return ModelArgs(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, attention=kind,
                     attention_options=options, initializer_range=0.05, max_position_embeddings=4096)


def packed_batch(kind: str, rows: list[list[int]], vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A packed batch of random tokens with the given document lengths per row (each document
    starting with BOS), positions by the kind's rule."""
    from longcpt.data.collate import Collator
    from longcpt.data.packing import labels_for

    g = torch.Generator().manual_seed(seed)
    windows = []
    for lens in rows:
        ids = torch.randint(3, vocab, (sum(lens),), generator=g)
        ids[torch.tensor([0, *lens]).cumsum(0)[:-1]] = 1  # every document starts with BOS
        windows.append({"input_ids": ids.numpy(), "labels": labels_for(ids.numpy(), lens), "doc_lens": lens})
    return Collator(kind)(windows)


def model_loss_and_grads(model, batch: dict, device: torch.device, autocast: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    on = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(on["input_ids"], on["labels"], on["position_ids"], on["cu_seqlens"])
    loss.backward()
    grads = torch.cat([p.grad.detach().double().flatten().cpu() for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), grads


def check_document_kinds(device: torch.device, quick: bool) -> Iterator[Result]:
    """`intra_doc` and `anchor` with every backend that has a backward, bf16 autocast vs float64 CPU."""
    from longcpt.model import CausalLM
    from longcpt.model.attention.document import available_backends

    seq_len = (1024 if device.type == "cuda" else 256) // (4 if quick else 1)
    for kind in ("intra_doc", "anchor"):
        torch.manual_seed(0)
        reference = CausalLM(tiny_args(kind, backend="sdpa")).double()
        g = torch.Generator().manual_seed(0)
        batch = packed_batch(kind, [document_lengths(seq_len, g) for _ in range(2)], reference.args.vocab_size)
        ref_loss, ref_grads = model_loss_and_grads(reference, batch, torch.device("cpu"), autocast=False)
        for backend in available_backends(device, torch.bfloat16):
            if backend == "flex" and device.type != "cuda":
                continue  # no backward on CPU; its forward is checked at kernel level
            model = CausalLM(tiny_args(kind, backend=backend))
            model.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
            model.to(device)
            loss, grads = model_loss_and_grads(model, batch, device, autocast=True)
            loss_err = abs(loss - ref_loss) / abs(ref_loss)
            grad_err = float(torch.linalg.vector_norm(grads - ref_grads) / torch.linalg.vector_norm(ref_grads))
            ok = loss_err <= MODEL_LOSS_TOL and grad_err <= MODEL_GRAD_TOL
            line = (f"tiny model, bf16 autocast: loss {loss:.4f} vs {ref_loss:.4f} (rel {loss_err:.1e}, tol "
                    f"{MODEL_LOSS_TOL:.0e}), grads rel {grad_err:.1e} (tol {MODEL_GRAD_TOL:.0e})")
            yield Result(SECTION, f"{kind} {backend}", PASS if ok else FAIL,
                         line if ok else line + ": beyond tolerance; report this with the JSON output",
                         {"loss": loss, "reference_loss": ref_loss, "loss_error": loss_err, "grad_error": grad_err})


def check_infini_memory(device: torch.device, quick: bool) -> Result:
    """Stream a document through Infini-attention under bf16 autocast: M and z stay float32 and finite,
    the logits stay close to the float32 run, and a training step's loss and gradients are finite."""
    from longcpt.model import CausalLM
    from longcpt.model.attention.infini import InfiniMemory

    segment, chunks = (16, 6) if quick else (32, 32)
    torch.manual_seed(0)
    model = CausalLM(tiny_args("infini", segment_len=segment)).to(device)
    ids = torch.randint(3, 256, (1, segment * chunks), generator=torch.Generator().manual_seed(1)).to(device)
    logits = {}
    problems = []
    for autocast in (False, True):
        state: dict = {}
        outs = []
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            for start in range(0, ids.shape[1], segment):
                pos = torch.arange(start, start + segment, device=device)[None]
                outs.append(model(ids[:, start:start + segment], position_ids=pos, state=state).float())
                for layer, memory in state.items():
                    if not isinstance(memory, InfiniMemory) or memory.memory is None:
                        continue
                    for name, t in (("M", memory.memory), ("z", memory.norm)):
                        if t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
                            problems.append(f"layer {layer} {name} is {t.dtype}"
                                            f"{'' if bool(torch.isfinite(t).all()) else ' and not finite'}")
        logits[autocast] = torch.cat(outs, 1)
    err = relative_error(logits[True], logits[False].double().cpu())
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "position_ids": torch.arange(ids.shape[1],
             device=device)[None], "cu_seqlens": torch.tensor([0, ids.shape[1]], dtype=torch.int32, device=device)}
    loss, grads = model_loss_and_grads(model, batch, device, autocast=True)
    if not (torch.isfinite(torch.tensor(loss)) and bool(torch.isfinite(grads).all())):
        problems.append(f"training loss {loss} or its gradients not finite under bf16 autocast")
    if not err <= 0.05:
        problems.append(f"logits under bf16 autocast differ from float32 by {err:.1e} (tol 5e-2)")
    line = (f"{chunks} segments of {segment} streamed under bf16 autocast: memory float32 and finite, "
            f"logits rel error {err:.1e} vs float32, training loss {loss:.3f} finite")
    data = {"logit_error": err, "segments": chunks, "loss": loss}
    if problems:
        return Result(SECTION, "infini memory bf16", FAIL, "; ".join(problems[:3]), data)
    return Result(SECTION, "infini memory bf16", PASS, line, data)

