"""`intra_doc` and `anchor`: causal attention inside each document of a packed window.

    kernels.py   the document layout and the kernels (flash-attn, torch varlen, FlexAttention,
                 SDPA), picked per call; the drawing of the mask is there
    sdpa.py      the SDPA kernels: on CPU, torch's flash kernel over document chunks (a custom op)
    doctor.py    `longcpt doctor`'s checks: the attention libraries, every kernel against a dense
                 reference, both kinds through a tiny model

One kernel serves both kinds; they differ only in the position ids the collator gives them
(`longcpt.batch`). This module registers them with their hooks; their models export and generate
as `full` (on one document it is the same function, with a KV cache).
"""

from __future__ import annotations

from torch import nn

from longcpt.model.attention import DEFAULT_KIND, KindHooks, Option, PlanTerms, causal_pairs, one_of, register
from longcpt.model.attention.document import doctor
from longcpt.model.attention.document.kernels import (
    _CACHE_KEY,
    BACKENDS,
    DocumentLayout,
    FlashAttnStatus,
    available_backends,
    document_attention,
    document_layout,
    flash_attn_status,
    pick_backend,
)
from longcpt.model.attention.document.sdpa import cpu_document_attention
from longcpt.model.attention.full import causal_attention

_OPTIONS = {
    "backend": Option("auto", one_of(*BACKENDS), "document kernel; auto picks the fastest usable one"),
}


class DocumentAttention(nn.Module):
    """Core of `intra_doc` and `anchor`: rotate at `ctx.position_ids`, then document-causal attention.

    The two kinds differ only in their position rule (`longcpt.batch`), which the collator (or
    `CausalLM.context`, when a caller passes `cu_seqlens` alone) applies before this runs.
    Options (`attention_options`): `backend` = auto | sdpa | varlen | flash_attn | flex.
    """

    def __init__(self, args, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = args.attention_options.get("backend", "auto")

    def forward(self, q, k, v, ctx):
        q, k = ctx.rotate(q, k)
        if ctx.cu_seqlens is None:  # one document per row: exactly `full`
            return causal_attention(q, k, v)
        if q.device.type == "cpu" and pick_backend(self.backend, q) == "sdpa":
            # The custom op reads the layout itself: nothing here for torch.compile to trace.
            return cpu_document_attention(q, k, v, ctx.cu_seqlens)
        layout = ctx.cache.get(_CACHE_KEY)
        if layout is None:
            layout = document_layout(ctx.cu_seqlens, q.shape[0], q.shape[2], q.device)
            ctx.cache[_CACHE_KEY] = layout
        return document_attention(q, k, v, layout, self.backend)


def _cpu_copies(shape, act: int, device: str, options: dict) -> int:
    """Bytes per token and layer the CPU path keeps beyond every block's: the per-document output
    and its re-ordered copy (the GPU kernels write in place)."""
    return act * shape.heads * shape.head_dim if device == "cpu" else 0


_HOOKS = KindHooks(inference_kind=DEFAULT_KIND, plan=PlanTerms(pairs=causal_pairs, layer_bytes=_cpu_copies),
                   doctor=doctor.checks)


@register("intra_doc", options=_OPTIONS, positions="document", sequence_parallel=True, hooks=_HOOKS)
class IntraDocAttention(DocumentAttention):
    """Documents cannot see each other; positions restart at 0 in every document."""


@register("anchor", options=_OPTIONS, positions="anchor", sequence_parallel=True, hooks=_HOOKS)
class AnchorAttention(DocumentAttention):
    """AnchorAttention (arXiv 2411.13476): as `intra_doc`, but positions are `arange` per row with
    0 at each document's BOS, the anchor every token of the document sees."""


__all__ = [
    "BACKENDS",
    "AnchorAttention",
    "DocumentAttention",
    "DocumentLayout",
    "FlashAttnStatus",
    "IntraDocAttention",
    "available_backends",
    "document_attention",
    "document_layout",
    "flash_attn_status",
]
