"""CPU stand-ins for the CUDA varlen kernels, so that longcpt's calls run through the libraries' own code.

* torch's `varlen_attn` is a Python wrapper (argument checks, `is_causal` from `window_size`, the GQA
  check) over the custom ops `torch_attn::_varlen_attn` and `torch_attn::_varlen_attn_backward`,
  whose autograd formula torch registers. Only the ops' CUDA kernels are missing on CPU:
  `cpu_varlen_kernels()` registers CPU kernels for them (forward and backward), so the real
  wrapper and the real autograd run. The kernels assert the flash kernels' input contract.
* `varlen_attn_before_2_13` is the wrapper as torch shipped it before 2.13 (`is_causal`, no GQA),
  over the same op, for longcpt's branch for older torch.
* flash-attn cannot be imported without its CUDA extension, so `flash_attn_varlen_func` is a double
  with the library's exact signature (flash-attn 2.8, `flash_attn_interface.py`) and contract.

The kernels compute in float32 per segment; the tests compare with a dense reference.
Shapes: total tokens N (all documents of all rows, concatenated), H heads (Hq, Hk), D head dim.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.attention.varlen as varlen
import torch.nn.functional as F

calls: list[dict] = []  # what the kernels were called with, newest last
_enabled = False


def check_contract(q: torch.Tensor, k: torch.Tensor, cu: torch.Tensor, max_len, gqa_allowed: bool) -> None:
    """The FlashAttention-2 varlen input contract: 16-bit (N, H, D), int32 cu on q's device, int max."""
    assert q.dtype in (torch.float16, torch.bfloat16), f"flash kernels are 16-bit only, got {q.dtype}"
    assert k.dtype == q.dtype and q.dim() == k.dim() == 3 and q.stride(-1) == k.stride(-1) == 1
    assert cu.dtype == torch.int32 and cu.device == q.device and cu.dim() == 1
    assert q.shape[0] == k.shape[0] == int(cu[-1]) and int(cu[0]) == 0
    assert type(max_len) is int and max_len == int((cu[1:] - cu[:-1]).max()), f"max_seqlen {max_len!r}"
    assert q.shape[1] % k.shape[1] == 0 and (gqa_allowed or q.shape[1] == k.shape[1])


def _segment_scores(q, k, cu, a, b, causal, scale):
    """Scores (Hq, n, n) of one segment in float32, and the repeated (Hq, n, D) keys' group size."""
    qs, ks = (x[a:b].transpose(0, 1).float() for x in (q, k))  # (H, n, D)
    rep = qs.shape[0] // ks.shape[0]
    s = qs @ ks.repeat_interleave(rep, 0).transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return s, rep


def _forward(q, k, v, cu, causal, scale):
    out, lse = torch.empty_like(q), torch.empty(q.shape[1], q.shape[0])  # (N, Hq, D), (Hq, N)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s, rep = _segment_scores(q, k, cu, a, b, causal, scale)
        vs = v[a:b].transpose(0, 1).float().repeat_interleave(rep, 0)  # (Hq, n, D)
        lse[:, a:b] = s.logsumexp(-1)
        out[a:b] = (s.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out, lse


def _backward(go, q, k, v, cu, causal, scale):
    """Attention's backward per segment: dS = P * (dP - rowsum(dO * O)); GQA sums over each group."""
    dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32) for x in (q, k, v))
    sc = scale if scale is not None else q.shape[-1] ** -0.5
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s, rep = _segment_scores(q, k, cu, a, b, causal, scale)
        qs, ks, vs, gs = (x[a:b].transpose(0, 1).float() for x in (q, k, v, go))  # (H, n, D)
        kr, vr = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)  # (Hq, n, D)
        p = s.softmax(-1)
        ds = p * (gs @ vr.transpose(-1, -2) - (gs * (p @ vr)).sum(-1, keepdim=True))
        dq[a:b] = (ds @ kr * sc).transpose(0, 1)
        hk = ks.shape[0]
        dk[a:b] = (ds.transpose(-1, -2) @ qs * sc).view(hk, rep, b - a, -1).sum(1).transpose(0, 1)
        dv[a:b] = (p.transpose(-1, -2) @ gs).view(hk, rep, b - a, -1).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _varlen_forward_cpu(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None,
                        window_size=None, enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert _enabled, "torch varlen has no CPU kernel outside cpu_varlen_kernels()"
    check_contract(query, key, cu_seq_q, max_q, enable_gqa)
    assert cu_seq_k is cu_seq_q and max_k == max_q  # self-attention over the same documents
    calls.append(dict(kernel="varlen", is_causal=is_causal, window_size=window_size, enable_gqa=enable_gqa,
                      hq=query.shape[1], hk=key.shape[1], dtype=query.dtype))
    out, lse = _forward(query, key, value, cu_seq_q, is_causal, scale)
    return out, lse, torch.zeros(2, dtype=torch.uint64)


def _varlen_backward_cpu(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, is_causal,
                         rng_state, scale=None, window_size=None):
    assert _enabled
    calls.append(dict(kernel="varlen_backward", is_causal=is_causal))
    return _backward(grad_out, query, key, value, cu_seq_q, is_causal, scale)


_registered = False


@contextlib.contextmanager
def cpu_varlen_kernels():
    """CPU kernels for torch's varlen custom ops while inside (the dispatcher keeps a registration
    for the whole process, so outside this context the kernels refuse to run)."""
    global _enabled, _registered
    if not _registered:
        varlen._varlen_attn.register_kernel("cpu")(_varlen_forward_cpu)
        varlen._varlen_attn_backward.register_kernel("cpu")(_varlen_backward_cpu)
        _registered = True
    calls.clear()
    _enabled = True
    try:
        yield calls
    finally:
        _enabled = False


def varlen_attn_before_2_13(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    is_causal: bool = False,
    return_aux=None,
) -> torch.Tensor:
    """torch 2.9-2.12's `varlen_attn`: `is_causal` instead of `window_size`, and no GQA (its op had
    no `enable_gqa`, so K/V must come with as many heads as Q). The op's leading arguments are
    unchanged in 2.13, so this is the old wrapper over today's op."""
    assert return_aux is None
    out, _, _ = torch.ops.torch_attn._varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal)
    return out


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """flash-attn's signature and contract (16-bit, int32 cu_seqlens, int max_seqlen, native GQA
    with head h of Q reading KV head h // (Hq/Hk)), computed per segment with SDPA (differentiable)."""
    check_contract(q, k, cu_seqlens_q, max_seqlen_q, gqa_allowed=True)
    assert cu_seqlens_k is cu_seqlens_q and max_seqlen_k == max_seqlen_q
    assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and not return_attn_probs
    assert tuple(window_size) == (-1, -1) and block_table is None
    calls.append(dict(kernel="flash_attn", causal=causal, hq=q.shape[1], hk=k.shape[1], dtype=q.dtype))
    out = []
    for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1).float() for x in (q, k, v))  # (H, n, D)
        y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale, enable_gqa=True)
        out.append(y.transpose(0, 1).to(q.dtype))  # (n, Hq, D)
    return torch.cat(out)
