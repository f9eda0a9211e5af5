"""`longcpt doctor`'s checks of `intra_doc` and `anchor` (`kernels.py`): libraries, kernels, the kinds.

Libraries (environment section): flash-attn (does it *load*, which version), torch's varlen
kernel and FlexAttention (importable).

Kernels: for each backend (`flash_attn`, `varlen`, `flex`, `sdpa`: what `available_backends`
lists for the device) and each 16-bit dtype, forward and backward at a few shapes (multi-head,
GQA, with a 1-token document and a long one in every row) are compared with a dense float64
reference run on the CPU from the same rounded inputs:

    error = max |kernel - reference| / max |reference|     (outputs, and dq, dk, dv)
    tolerance = 8 x the dtype's machine epsilon (bf16: 8 x 2^-7 = 6.2e-2, fp16: 8 x 2^-10 = 7.8e-3)

A `32-true` recipe also gets float32: on a GPU it trains with FlexAttention in float32 (compiled;
flash-attn and torch's varlen are 16-bit only), which nothing else checks. Its tolerance is that
of TF32 (8 x 2^-10), the precision float32 matmuls may run in
(`torch.set_float32_matmul_precision("high")`); in true float32 the error is ~1e-7.

Measured on a CPU with the SDPA path: at most 0.8 eps (gradients, GQA). A mask that leaks across
documents or drops a token is off by O(1). FlexAttention has no backward on CPU, so there
only its forward is checked (and eagerly: the compiled CPU path is tested by longcpt's tests).

The kinds: `intra_doc` and `anchor` share that kernel and differ in positions only, so they are
checked through a tiny model with every backend that has a backward (`KindCheckTools.model_check`:
loss and gradients under bf16 autocast against the float64 model on the CPU).

Shapes: B batch, T tokens, H heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longcpt.model.attention.document.kernels import (
    BACKENDS,
    available_backends,
    document_attention,
    document_layout,
    flash_attn_status,
)

EPS_FACTOR = 8
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP32 = {"fp32": torch.float32}
TF32_EPS = 2.0**-10  # float32 matmuls may run in TF32 (10 mantissa bits)


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int


def checks(tools) -> list:
    """The doctor's checks of the document kinds: (section, name, run) (`KindCheckTools`)."""
    return [
        (tools.ENVIRONMENT, "attention libraries", lambda: check_libraries(tools)),
        (tools.KERNELS, "document kernels", lambda: check_kernels(tools.device, tools.quick, tools)),
        (tools.KERNELS, "intra_doc / anchor", lambda: check_kinds(tools)),
    ]


# ----------------------------------------------------------------------------------------------
# Libraries


def check_libraries(tools) -> list:
    """flash-attn (loads, version), torch's varlen kernel and FlexAttention (importable)."""
    env, backend_option = tools.ENVIRONMENT, tools.recipe_options.get("backend")
    status = flash_attn_status()
    if status.usable:
        flash = tools.result(env, "flash-attn", tools.PASS, f"flash-attn {status.version} loads",
                             {"version": status.version})
    elif status.installed:
        flash = tools.result(env, "flash-attn", tools.FAIL, f"installed but does not load ({status.error}): torch "
                             "varlen is used instead; install the flash-attn wheel built for this torch/CUDA, or "
                             "uninstall it", {"error": status.error})
    else:
        need = backend_option == "flash_attn"
        flash = tools.result(env, "flash-attn", tools.FAIL if need else tools.SKIP,
                             "not installed" + (" but attention.backend=flash_attn asks for it: pip install "
                                                "flash-attn --no-build-isolation" if need else
                                                " (optional: torch varlen is used)"))
    results = [flash]
    for name, module in (("torch varlen", "torch.nn.attention.varlen"),
                         ("FlexAttention", "torch.nn.attention.flex_attention")):
        try:
            __import__(module)
        except ImportError as e:
            results.append(tools.result(env, name, tools.SKIP, f"not in torch {torch.__version__} ({e})"))
        else:
            results.append(tools.result(env, name, tools.PASS, f"{module} in torch {torch.__version__}"))
    return results


# ----------------------------------------------------------------------------------------------
# Kernels against a dense reference


def shapes(device: torch.device, quick: bool) -> list[Shape]:
    """Multi-head and GQA shapes; longer on a GPU, shorter with --quick (the float64 reference on
    the CPU holds a (B, H, T, T) score matrix, which bounds T)."""
    t = 1024 if device.type == "cuda" else 256
    t = t // 4 if quick else t
    return [Shape("mha", 2, t // 2, 4, 4, 64), Shape("gqa", 1, t, 8, 2, 128)]


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


def kernel_errors(backend: str, dtype: torch.dtype, device: torch.device, shape: Shape, tools, seed: int = 0,
                  backward: bool = True) -> dict[str, float]:
    """Relative errors of one backend at one shape: `out` and, with `backward`, `dq`, `dk`, `dv`."""
    from longcpt.batch import cu_seqlens_for

    g = torch.Generator().manual_seed(seed)
    rows = [tools.document_lengths(shape.seq_len, g) for _ in range(shape.batch)]
    cu = cu_seqlens_for(rows)
    b, t, d = shape.batch, shape.seq_len, shape.head_dim
    base = [torch.randn(b, h, t, d, generator=g).to(dtype) for h in (shape.heads, shape.kv_heads, shape.kv_heads)]
    upstream = torch.randn(b, shape.heads, t, d, generator=g).to(dtype)

    ref_in = [x.double().requires_grad_(backward) for x in base]
    ref = dense_document_attention(*ref_in, cu)
    if backward:
        (ref * upstream.double()).sum().backward()

    xs = [x.to(device).requires_grad_(backward) for x in base]
    out = document_attention(*xs, document_layout(cu.to(device), b, t, device), backend=backend)
    errors = {"out": tools.relative_error(out, ref.detach())}
    if backward:
        (out * upstream.to(device)).sum().backward()
        for name, x, r in zip(("dq", "dk", "dv"), xs, ref_in):
            errors[name] = tools.relative_error(x.grad, r.grad)
    return errors


def check_backend(backend: str, dtype_name: str, device: torch.device, quick: bool, tools):
    """One backend in one dtype over every shape: the worst relative error against the tolerance."""
    dtype = {**DTYPES, **FP32}[dtype_name]
    backward = not (backend == "flex" and device.type != "cuda")  # no FlexAttention backward on CPU
    tol = EPS_FACTOR * (TF32_EPS if dtype == torch.float32 else torch.finfo(dtype).eps)
    worst: dict[str, float] = {}
    per_shape = {}
    for shape in shapes(device, quick):
        errors = kernel_errors(backend, dtype, device, shape, tools, backward=backward)
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
    name = f"{backend} {dtype_name}"
    if bad:
        return tools.result(tools.KERNELS, name, tools.FAIL, line + f": {', '.join(bad)} beyond tolerance; force "
                            "another kernel with attention.backend=... and report this", data)
    return tools.result(tools.KERNELS, name, tools.PASS, line, data)


def check_kernels(device: torch.device, quick: bool, tools) -> Iterator:
    """Every backend usable on `device` in bf16 and fp16, and in float32 for a `32-true` recipe
    (those that are not usable: a SKIP line)."""
    dtypes = {**DTYPES, **(FP32 if getattr(tools, "precision", None) == "32-true" else {})}
    for dtype_name, dtype in dtypes.items():
        usable = available_backends(device, dtype)
        for backend in usable:
            yield check_backend(backend, dtype_name, device, quick, tools)
        missing = [b for b in BACKENDS if b not in usable and b != "auto"]
        if missing:
            why = ("CUDA only" if device.type != "cuda" else "16-bit kernels" if dtype == torch.float32
                   else "not usable on this GPU/dtype (see environment)")
            yield tools.result(tools.KERNELS, f"{'/'.join(missing)} {dtype_name}", tools.SKIP, why)


# ----------------------------------------------------------------------------------------------
# The kinds through a tiny model


def check_kinds(tools) -> Iterator:
    """`intra_doc` and `anchor` with every backend that has a backward, bf16 autocast vs float64 CPU."""
    device = tools.device
    backends = [b for b in available_backends(device, torch.bfloat16)
                if not (b == "flex" and device.type != "cuda")]  # no backward on CPU; its forward is checked above
    for kind in ("intra_doc", "anchor"):
        yield from tools.model_check(kind, [{"backend": b} for b in backends], reference={"backend": "sdpa"},
                                     name=lambda options, kind=kind: f"{kind} {options['backend']}")
