"""The leak probe: does the model, exactly as training runs it, keep documents apart?

A loss comparison cannot see a leaking mask: on the doctor's tiny step model a fully leaking mask
moves the first loss by 1.5e-3, inside the 2e-2 tolerance of `bf16-mixed`. The probe asks the
question directly, on the model a training step runs (its strategy, attention backend, precision,
sequence-parallel group and ZeRO-3 partitions), with a packed window whose documents it knows:

    window (one row of 2):  | doc 0 ......... | doc 1 (probed) ....... | doc 2 ...... |
    1. change doc 1's tokens after its first:  every token of doc 0 and doc 2 keeps its logits
       (kinds that attend across documents, e.g. `full`: every token before the change does)
    2. change doc 1's first token only (its BOS, the anchor of `anchor`): doc 1's later tokens
       move (the anchor stays visible), the other documents do not

Equal means bit-equal on the CPU, where every kernel computes a token from its own inputs only,
and within a few units of the dtype's rounding on a GPU. A mask that leaks, or that hides a
document's first token, fails by construction whatever the loss tolerance.

Shapes: B rows, T tokens per row, V vocabulary; under sequence parallelism a rank holds t = T/N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Documents of each row of the probe window (T = 64, as the doctor's training step).
PROBE_ROWS = ((17, 25, 22), (30, 34))
PROBED = (0, 1)  # (row, document index in the row)


@dataclass(frozen=True)
class LeakReport:
    """What the probe measured, on this rank's tokens.

    Attributes:
        stayed: max |logit change| over tokens that cannot see the changed tokens (must be 0, or
            <= tolerance).
        moved: min over the probed document's later tokens of their max |logit change| when its
            tokens changed (> tolerance: the probe changed something they see).
        anchor_moved: the same when only its first token changed (> tolerance: it stays visible).
        anchor_stayed: max |logit change| outside the probed document when only its first token changed.
        tolerance: 0 on the CPU, else a few units of the logits' rounding.
        tokens: tokens this rank checked.
    """

    stayed: float
    moved: float
    anchor_moved: float
    anchor_stayed: float
    tolerance: float
    tokens: int

    @property
    def ok(self) -> bool:
        return (self.stayed <= self.tolerance and self.anchor_stayed <= self.tolerance
                and self.moved > self.tolerance and self.anchor_moved > self.tolerance)

    def problems(self) -> list[str]:
        out = []
        if self.stayed > self.tolerance:
            out.append(f"logits of other documents moved by {self.stayed:.2e} when one document's tokens changed "
                       f"(tolerance {self.tolerance:.1e}): the attention mask leaks across documents")
        if self.anchor_stayed > self.tolerance:
            out.append(f"logits of other documents moved by {self.anchor_stayed:.2e} when one document's first "
                       "token changed: the mask leaks")
        if self.moved <= self.tolerance:
            out.append("the probed document's own later tokens did not move when its tokens changed: the probe "
                       "saw no attention at all")
        if self.anchor_moved <= self.tolerance:
            out.append("changing a document's first token (its anchor) left its later tokens unchanged: the mask "
                       "hides the anchor")
        return out


def probe_window(kind: str, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The probe's packed window (`PROBE_ROWS`), positions by the kind's rule, on `device`."""
    from longcpt.doctor.kernels import packed_batch

    batch = packed_batch(kind, [list(r) for r in PROBE_ROWS], vocab, seed=11)
    return {k: v.to(device) for k, v in batch.items()}


def _probed_span() -> tuple[int, int, int]:
    """(row, start, length) of the probed document."""
    row, doc = PROBED
    lens = PROBE_ROWS[row]
    return row, sum(lens[:doc]), lens[doc]


def _changed(ids: torch.Tensor, vocab: int, start: int, stop: int) -> torch.Tensor:
    """`ids` with the tokens of row `PROBED[0]`, columns [start, stop), replaced by others (never BOS/EOS/pad)."""
    row = PROBED[0]
    out = ids.clone()
    span = out[row, start:stop]
    out[row, start:stop] = 3 + (span - 3 + 1 + torch.arange(len(span), device=ids.device) % 5) % (vocab - 3)
    assert not torch.equal(out, ids)
    return out


def leak_probe(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batch: dict[str, torch.Tensor],
    vocab: int,
    across_documents: bool,
    token_offset: int = 0,
) -> LeakReport:
    """Run the probe (module docstring) through `forward`.

    Args:
        forward: the model's forward as training runs it (its precision context included): a
            batch -> logits (B, t, V) of this rank's tokens. Called three times, on every rank.
        batch: `probe_window`'s batch.
        vocab: V.
        across_documents: the kind attends across documents (only causality is then checked).
        token_offset: the index in the window of this rank's first token (sequence parallelism:
            rank r holds tokens [r*t, (r+1)*t)).

    Returns:
        The measurements (`LeakReport.ok` is the verdict).
    """
    row, start, length = _probed_span()
    ids = batch["input_ids"]
    with torch.no_grad():
        base = forward(batch).float()
        body = forward({**batch, "input_ids": _changed(ids, vocab, start + 1, start + length)}).float()
        anchor = forward({**batch, "input_ids": _changed(ids, vocab, start, start + 1)}).float()
    t = base.shape[1]
    column = torch.arange(token_offset, token_offset + t, device=base.device)  # (t,) window index of each token
    rows = torch.arange(base.shape[0], device=base.device)[:, None]  # (B, 1)
    in_row = rows == row  # (B, 1)
    in_doc = in_row & (column >= start) & (column < start + length)  # (B, t)
    later = in_doc & (column > start)  # tokens of the probed document that see both changes
    if across_documents:  # a token sees every earlier token of its row
        sees_body = in_row & (column > start)
        sees_anchor = in_row & (column >= start)
    else:
        sees_body, sees_anchor = later, in_doc
    body_change = (body - base).abs().amax(-1)  # (B, t)
    anchor_change = (anchor - base).abs().amax(-1)
    tolerance = _tolerance(base)

    def worst(change: torch.Tensor, where: torch.Tensor) -> float:
        return float(change[where].max()) if bool(where.any()) else 0.0

    def least(change: torch.Tensor, where: torch.Tensor) -> float:
        return float(change[where].min()) if bool(where.any()) else float("inf")  # no such token on this rank

    return LeakReport(stayed=worst(body_change, ~sees_body), moved=least(body_change, later),
                      anchor_moved=least(anchor_change, later), anchor_stayed=worst(anchor_change, ~sees_anchor),
                      tolerance=tolerance, tokens=int(base.shape[0] * t))


def _tolerance(logits: torch.Tensor) -> float:
    """0 on the CPU; on a GPU 4 units of bf16 rounding of the largest logit (kernels may pick other
    tilings for other inputs)."""
    if logits.device.type == "cpu":
        return 0.0
    return 4 * torch.finfo(torch.bfloat16).eps * float(logits.abs().max())


def report_data(report: LeakReport) -> dict[str, Any]:
    """The report as JSON-ready numbers (the doctor's `data`)."""
    return {"stayed": report.stayed, "moved": report.moved, "anchor_moved": report.anchor_moved,
            "anchor_stayed": report.anchor_stayed, "tolerance": report.tolerance, "tokens": report.tokens,
            "ok": report.ok}
