"""The document kernels of `intra_doc` and `anchor`: causal attention inside each document of a packed window.

One kernel serves both kinds; they differ only in the position ids the collator gives them
(`longcpt.batch`). A window of 9 tokens holding three documents, each starting with its own BOS
(`B`), attends like this (`x` = may attend, `.` = masked):

    keys ->      B a b  B c d e  B f          intra_doc positions:  0 1 2  0 1 2 3  0 1
    B            x                            anchor positions:     0 1 2  0 4 5 6  0 8
    a            x x                          full positions:       0 1 2  3 4 5 6  7 8
    b            x x x
    B                   x
    c                   x x
    d                   x x x
    e                   x x x x
    B                            x
    f                            x x

Why one kernel is enough for AnchorAttention (arXiv 2411.13476, section 4; official code
haonan3/AnchorContext, "flash" engine): the paper's anchor is one shared first token at
position 0 that every token sees. Here every document carries its own copy of BOS at position 0
and attends to it causally. A BOS at position 0 that starts its own document sees only itself,
so every copy has the same hidden state in every layer as the one shared anchor; each document
therefore computes exactly what it would with the shared anchor, and the block-diagonal causal
mask above is the whole of AnchorAttention. The other tokens keep their `arange` positions (not
reset), so the distance to the anchor is the token's absolute index.

Kernels, picked per call (`backend="auto"`):
  * CUDA, fp16/bf16: flash-attn's `flash_attn_varlen_func` when it loads (`flash_attn_status`:
    an installed wheel built for another torch does not), else torch's own
    `torch.nn.attention.varlen.varlen_attn`; both take `cu_seqlens` directly (no mask at all).
  * CUDA otherwise: FlexAttention with the document mask as a `BlockMask`, both compiled once
    for every shape (`dynamic=True`, see `_compiled`).
  * CPU: torch's CPU flash-attention kernel over chunks of each document (`sdpa.py`), with
    documents of similar length batched into one call per chunk. FlexAttention has no backward on
    CPU (torch 2.13), and a dense (T, T) mask drops SDPA to a slow path that is slower than no
    mask at all (docs/benchmarks.md). Batching is exact: documents are right-padded to the
    longest of their bucket, and under a causal mask a real token never sees the padding after
    it. The kernel is one custom op, so `torch.compile` neither breaks nor recompiles on it.
  * `sdpa` on a GPU: one `is_causal` SDPA call per bucket of documents.
The document grouping is computed once per forward (`document_layout`, kept in `ctx.cache`) and
shared by every layer.

Shapes: B batch, T tokens per row, N documents, H heads (Hq query, Hk KV), D head dim.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import warnings
from dataclasses import dataclass, field

import torch

from longcpt.batch import document_spans
from longcpt.errors import LongcptError
from longcpt.model.attention.document.sdpa import bucketed_sdpa, chunk_plan, document_flash
from longcpt.model.attention.full import causal_attention

BACKENDS = ("auto", "sdpa", "varlen", "flash_attn", "flex")
_CACHE_KEY = "document_layout"


# ----------------------------------------------------------------------------------------------
# Document layout: pure functions of cu_seqlens, computed once per forward.


@dataclass
class DocumentLayout:
    """Where the documents of a packed batch are, and how each kernel will visit them.

    Attributes:
        batch, seq_len: B and T of the batch.
        starts, lengths: flat start and length of each of the N documents, in order.
        cu_seqlens: (N+1,) int32 on the compute device.
    """

    batch: int
    seq_len: int
    starts: list[int]
    lengths: list[int]
    cu_seqlens: torch.Tensor
    _plans: dict = field(default_factory=dict, repr=False)

    @property
    def whole_rows(self) -> bool:
        """True when every document is a whole row (plain causal attention per row)."""
        return all(n == self.seq_len for n in self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def document_ids(self) -> torch.Tensor:
        """(B, T) int32 index of the document each token belongs to (for FlexAttention)."""
        if "doc_ids" not in self._plans:
            lengths = torch.tensor(self.lengths, device=self.cu_seqlens.device)
            ids = torch.repeat_interleave(torch.arange(len(self.lengths), device=lengths.device), lengths)
            self._plans["doc_ids"] = ids.to(torch.int32).view(self.batch, self.seq_len)
        return self._plans["doc_ids"]

    def block_mask(self):
        """FlexAttention `BlockMask` for `causal & same document` (computed on first use, then kept)."""
        if "block_mask" not in self._plans:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.document_ids()  # (B, T)

            def same_document_causal(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

            device = self.cu_seqlens.device
            # Compiled on CUDA: the eager builder materialises the full (T, T) mask first.
            build = _compiled("create_block_mask") if device.type in _COMPILED_DEVICES else create_block_mask
            self._plans["block_mask"] = build(
                same_document_causal, self.batch, None, self.seq_len, self.seq_len, device=device
            )
        return self._plans["block_mask"]


def document_layout(
    cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, device: torch.device | str = "cpu"
) -> DocumentLayout:
    """Check `cu_seqlens` (`longcpt.batch.document_spans`) and describe the documents.

    Args:
        cu_seqlens: (N+1,) document starts over the flattened B*T tokens (0 first, B*T last), or
            None for one document per row.
        batch, seq_len: B and T.
        device: where the kernels run.

    Returns:
        The layout (one host sync to read `cu_seqlens`).

    Raises:
        LongcptError: `cu_seqlens` breaks the packed-batch contract (see `longcpt.batch`).
    """
    spans = document_spans(cu_seqlens, batch, seq_len)
    starts, lengths = [s.start for s in spans], [s.length for s in spans]
    cu = torch.tensor([*starts, batch * seq_len], dtype=torch.int32, device=device)
    return DocumentLayout(batch, seq_len, starts, lengths, cu)


# ----------------------------------------------------------------------------------------------
# Kernels. All take token-major tensors q (B*T, Hq, D), k/v (B*T, Hk, D) and return (B*T, Hq, D).


def _sdpa_documents(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout
) -> torch.Tensor:
    """Exact document-causal attention from SDPA's kernels: chunked flash on CPU, else per bucket."""
    if q.device.type == "cpu":
        return document_flash(q, k, v, layout.cu_seqlens, layout.seq_len)[0]
    return bucketed_sdpa(q, k, v, chunk_plan(layout.cu_seqlens, layout.batch, layout.seq_len))


def _varlen_documents(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout
) -> torch.Tensor:
    """torch's own varlen flash kernel (CUDA, fp16/bf16); causal within each cu_seqlens segment.

    Its keywords changed across torch releases: `window_size=(-1, 0)` and `enable_gqa` (2.13) or
    `is_causal=True` and no GQA (earlier), where the KV heads are repeated here instead.
    """
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    cu, m = layout.cu_seqlens, layout.max_len
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B*T, Hq, D)
    return varlen_attn(q, k, v, cu, cu, m, m, **kwargs)


def _flash_attn_documents(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout
) -> torch.Tensor:
    """flash-attn's varlen kernel (the official AnchorContext engine); handles GQA natively."""
    from flash_attn import flash_attn_varlen_func

    cu, m = layout.cu_seqlens, layout.max_len
    return flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)


# Devices on which FlexAttention and its block mask run compiled (on CPU it has no backward, and
# the eager forward is kept as a slow reference), and the torch.compile backend (tests count
# compilations with a counting backend).
_COMPILED_DEVICES = ("cuda",)
_COMPILE_BACKEND = "inductor"


def _compiled(name: str):
    """`torch.compile` of a `torch.nn.attention.flex_attention` function, built once per process.

    `dynamic=True` compiles one kernel for every window length and batch size. Compiled per shape
    (`dynamic=False`), each new (B, T) recompiles, and once dynamo's recompile limit
    (`torch._dynamo.config.recompile_limit`, 8) is reached torch runs flex_attention eagerly,
    which materialises the (T, T) score matrix. `create_block_mask` is compiled the same way:
    its `_compile=True` flag is deprecated in torch 2.13 (torch.compile(create_block_mask) is the
    documented replacement) and made a fresh compiled wrapper on every call.
    """
    return _compiled_with(name, _COMPILE_BACKEND)


@functools.cache
def _compiled_with(name: str, backend):
    from torch.nn.attention import flex_attention as flex

    return torch.compile(getattr(flex, name), dynamic=True, backend=backend)


def _flex_documents(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout
) -> torch.Tensor:
    """FlexAttention with the document mask; compiled on CUDA, eager (a slow reference) on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    b, t = layout.batch, layout.seq_len

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2)  # (B, H, T, D)

    kernel = _compiled("flex_attention") if q.device.type in _COMPILED_DEVICES else flex_attention
    gqa = q.shape[1] != k.shape[1]
    y = kernel(
        rows(q), rows(k), rows(v), block_mask=layout.block_mask(), enable_gqa=gqa
    )  # (B, Hq, T, D)
    return y.transpose(1, 2).reshape(b * t, q.shape[1], q.shape[2])


_KERNELS = {
    "sdpa": _sdpa_documents,
    "varlen": _varlen_documents,
    "flash_attn": _flash_attn_documents,
    "flex": _flex_documents,
}


@dataclass(frozen=True)
class FlashAttnStatus:
    """What importing flash-attn gave: `version` when it loads, else why not (`error`, None when
    it is simply not installed)."""

    installed: bool
    version: str | None = None
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.version is not None


@functools.cache
def flash_attn_status() -> FlashAttnStatus:
    """Try-import flash-attn's varlen kernel once per process.

    Being installed is not enough: prebuilt wheels are compiled against one torch/CUDA build, and
    against another their extension (`flash_attn_2_cuda`) fails to load with "undefined symbol"
    (an ImportError) or a missing CUDA library (ImportError/OSError); flash-attn 1.x has no
    `flash_attn_varlen_func` at all. Any of these leaves flash-attn unusable; the first time it is
    asked, a warning says so and that torch's own varlen kernel is used instead.
    """
    if importlib.util.find_spec("flash_attn") is None:
        return FlashAttnStatus(installed=False)
    try:
        import flash_attn
        from flash_attn import flash_attn_varlen_func  # noqa: F401  (loads the CUDA extension)
    except (ImportError, OSError) as e:
        error = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        warnings.warn(
            f"flash-attn is installed but does not load ({error}); document attention uses torch's varlen "
            "kernel instead. Fix: install the flash-attn wheel built for this torch and CUDA, or uninstall it.",
            RuntimeWarning, stacklevel=2,
        )
        return FlashAttnStatus(installed=True, error=error)
    return FlashAttnStatus(installed=True, version=getattr(flash_attn, "__version__", "unknown"))


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Backends usable for tensors of `device`/`dtype`, in the order `auto` prefers them."""
    device = torch.device(device)
    if device.type != "cuda":
        # Eager FlexAttention runs on CPU (forward only, slowly): usable on request, for checks.
        return ["sdpa", "flex"]
    found = []
    # Both varlen kernels are FlashAttention-2: fp16/bf16 on Ampere (sm80) or newer.
    if dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(device) >= (8, 0):
        if flash_attn_status().usable:
            found.append("flash_attn")
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            found.append("varlen")
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        found.append("flex")
    return [*found, "sdpa"]


def pick_backend(backend: str, q: torch.Tensor) -> str:
    """`backend` itself, or for `auto` the first of `available_backends` for `q`'s device and dtype.

    Raises:
        LongcptError: a backend that cannot run on these tensors was requested.
    """
    usable = available_backends(q.device, q.dtype)
    if backend == "auto":
        return usable[0]
    if backend not in usable:
        raise LongcptError(
            f"attention backend {backend!r} cannot run on {q.device.type} {q.dtype}; "
            f"usable here: {', '.join(usable)} (or 'auto')"
        )
    return backend


def document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout, backend: str = "auto"
) -> torch.Tensor:
    """Causal attention within each document of `layout`.

    Args:
        q: (B, Hq, T, D) rotated queries; k, v: (B, Hk, T, D).
        layout: from `document_layout` for the same B and T.
        backend: one of `BACKENDS`; `auto` takes the first of `available_backends`.

    Returns:
        (B, Hq, T, D).

    Raises:
        LongcptError: a backend that cannot run on these tensors was requested.
    """
    b, hq, t, d = q.shape
    if layout.whole_rows:  # one document per row: exactly `full`
        return causal_attention(q, k, v)
    backend = pick_backend(backend, q)

    def tokens(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(b * t, x.shape[1], d)  # (B*T, H, D)

    y = _KERNELS[backend](tokens(q), tokens(k), tokens(v), layout)  # (B*T, Hq, D)
    return y.view(b, t, hq, d).transpose(1, 2)  # (B, Hq, T, D)
