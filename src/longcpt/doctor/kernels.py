"""Kernel checks: what every trainable attention kind asks `longcpt doctor` to check.

Each kind declares its checks through its `doctor` hook (`longcpt.model.attention.KindHooks`):
the document kinds check their kernels against a dense float64 reference and run through a tiny
model, Infini-attention streams its memory under bf16 autocast, `full` runs through a tiny model.
This module gives them the shared pieces (`KindCheckTools`): a tiny model's arguments, packed
batches, relative errors, and the model check every kind can use:

    a tiny model's loss and parameter gradients on the device under bf16 autocast (what
    `bf16-mixed` runs), against the same model in float64 on the CPU

    MODEL_LOSS_TOL = 1e-2 (relative), MODEL_GRAD_TOL = 5e-2 (|g - g_ref| / |g_ref| over all
    parameter gradients). Measured on CPU: 5e-5 and 9e-3; a mask leaking across documents gives a
    gradient error of 1.1, intra_doc positions fed to anchor 0.15 (init std 0.05 keeps attention
    sharp enough for positions to matter).

A kind's check that raises is a FAIL row naming the exception, like every other check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from longcpt.doctor.environment import SECTION as ENVIRONMENT
from longcpt.doctor.report import FAIL, PASS, SKIP, Check, Result

SECTION = "kernels"
MODEL_LOSS_TOL = 1e-2
MODEL_GRAD_TOL = 5e-2


def document_lengths(seq_len: int, generator: torch.Generator) -> list[int]:
    """One row's documents: a long one, a 1-token one, then random lengths filling the row."""
    lens, left = [seq_len // 3, 1], seq_len - seq_len // 3 - 1
    while left:
        n = min(left, int(torch.randint(2, max(3, seq_len // 4), (1,), generator=generator)))
        lens.append(n)
        left -= n
    return lens


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (inf when `got` is not finite)."""
    got = got.detach().double().cpu()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def tiny_args(kind: str, **options):
    """`ModelArgs` of the tiny model the checks run (2 layers, 128 wide, GQA)."""
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
    """The loss of `batch` and every parameter gradient (float64, flattened) after one backward."""
    model.zero_grad(set_to_none=True)
    on = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(on["input_ids"], on["labels"], on["position_ids"], on["cu_seqlens"])
    loss.backward()
    grads = torch.cat([p.grad.detach().double().flatten().cpu() for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), grads


class KindCheckTools:
    """What a kind's `doctor` hook gets: where the checks run, and the shared pieces.

    Attributes:
        device: the device checked.
        quick: smaller shapes (`--quick`).
        recipe_options: the recipe's attention options ({} without a recipe).
        precision: the recipe's `trainer.precision` (None without a recipe).
        ENVIRONMENT, KERNELS: the sections a check may report in.
        PASS, FAIL, SKIP: the statuses.
    """

    ENVIRONMENT, KERNELS = ENVIRONMENT, SECTION
    PASS, FAIL, SKIP = PASS, FAIL, SKIP

    def __init__(self, device: torch.device, quick: bool, recipe_options: dict[str, Any] | None = None,
                 precision: str | None = None):
        self.device, self.quick, self.recipe_options = device, quick, dict(recipe_options or {})
        self.precision = precision

    result = staticmethod(Result)
    document_lengths = staticmethod(document_lengths)
    relative_error = staticmethod(relative_error)
    tiny_args = staticmethod(tiny_args)
    packed_batch = staticmethod(packed_batch)
    model_loss_and_grads = staticmethod(model_loss_and_grads)

    def model_check(self, kind: str, variants: list[dict[str, Any]], reference: dict[str, Any] | None = None,
                    name: Callable[[dict[str, Any]], str] | None = None) -> Iterator[Result]:
        """`kind` with each of `variants` (option sets) on the device under bf16 autocast, against the
        float64 CPU model with `reference` options: one row per variant (module docstring)."""
        from longcpt.model import CausalLM

        device = self.device
        seq_len = (1024 if device.type == "cuda" else 256) // (4 if self.quick else 1)
        torch.manual_seed(0)
        ref_model = CausalLM(tiny_args(kind, **(reference or {}))).double()
        g = torch.Generator().manual_seed(0)
        batch = packed_batch(kind, [document_lengths(seq_len, g) for _ in range(2)], ref_model.args.vocab_size)
        ref_loss, ref_grads = model_loss_and_grads(ref_model, batch, torch.device("cpu"), autocast=False)
        for options in variants:
            model = CausalLM(tiny_args(kind, **options))
            model.load_state_dict({k: v.float() for k, v in ref_model.state_dict().items()})
            model.to(device)
            loss, grads = model_loss_and_grads(model, batch, device, autocast=True)
            loss_err = abs(loss - ref_loss) / abs(ref_loss)
            grad_err = float(torch.linalg.vector_norm(grads - ref_grads) / torch.linalg.vector_norm(ref_grads))
            ok = loss_err <= MODEL_LOSS_TOL and grad_err <= MODEL_GRAD_TOL
            line = (f"tiny model, bf16 autocast: loss {loss:.4f} vs {ref_loss:.4f} (rel {loss_err:.1e}, tol "
                    f"{MODEL_LOSS_TOL:.0e}), grads rel {grad_err:.1e} (tol {MODEL_GRAD_TOL:.0e})")
            yield Result(SECTION, name(options) if name else kind, PASS if ok else FAIL,
                         line if ok else line + ": beyond tolerance; report this with the JSON output",
                         {"loss": loss, "reference_loss": ref_loss, "loss_error": loss_err, "grad_error": grad_err})


def kind_checks(device: torch.device, quick: bool, recipe_options: dict[str, Any] | None = None,
                precision: str | None = None) -> list[Check]:
    """The checks every trainable attention kind declares (`doctor` hooks), each once, in registry order.

    Kinds that share a hook (the document kinds) share its checks.
    """
    from longcpt.model.attention import KINDS

    tools = KindCheckTools(device, quick, recipe_options, precision)
    checks, seen = [], set()
    for spec in KINDS.values():
        hook = spec.hooks.doctor
        if not spec.trainable or hook is None or hook in seen:
            continue
        seen.add(hook)
        checks += [Check(section, name, run) for section, name, run in hook(tools)]
    return checks
