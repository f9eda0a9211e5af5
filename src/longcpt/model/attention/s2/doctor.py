"""`longcpt doctor`'s checks of `s2`: the grouped attention against a dense reference, and the kind
through a tiny model.

Groups: the core on the device in bf16 (MHA and GQA, packed rows with a 1-token document, shift
on and off), forward and backward, against the same inputs in float64 on the CPU attended with an
explicit (B, Hq, T, T) mask built from group indices (`dense_reference`). Tolerance as the
document kernels': 8 x bf16's machine epsilon. A group or a document leaking is off by O(1).

The kind: `KindCheckTools.model_check` (loss and gradients under bf16 autocast against the float64
model on the CPU).

Shapes: B batch, T tokens, Hq query heads, Hk KV heads, D head dim, G group size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS_FACTOR = 8
GROUP = 16  # tokens per group of the checks: several groups per document at the doctor's lengths


def checks(tools) -> list:
    """The doctor's checks of `s2`: (section, name, run) (`KindCheckTools`)."""
    return [
        (tools.KERNELS, "s2 groups", lambda: check_groups(tools)),
        (tools.KERNELS, "s2", lambda: tools.model_check(
            "s2", [{"group_size": GROUP}], reference={"group_size": GROUP, "backend": "sdpa"},
            name=lambda options: "s2 (tiny model)")),
    ]


def group_mask(cu_seqlens: torch.Tensor, batch: int, seq_len: int, heads: int, group_size: int,
               shift: bool) -> torch.Tensor:
    """(B, Hq, T, T) boolean: query i of head h may attend key j (same document, same group, j <= i).

    A token's group is counted from its document's start: (position in the document + G - offset)
    // G, offset G/2 for the last Hq - Hq // 2 heads when `shift`, else 0.
    """
    flat = torch.arange(batch * seq_len)
    cu = cu_seqlens.long().cpu()
    doc = torch.searchsorted(cu[1:], flat, right=True)  # (B*T,) document of each token
    pos = (flat - cu[doc]).view(batch, seq_len)  # (B, T) position in its document
    offsets = torch.tensor([group_size // 2 if shift and h >= heads // 2 else 0 for h in range(heads)])
    group = (pos[:, None, :] + group_size - offsets[None, :, None]) // group_size  # (B, Hq, T)
    doc = doc.view(batch, 1, seq_len)
    same = (doc[..., :, None] == doc[..., None, :]) & (group[..., :, None] == group[..., None, :])  # (B, Hq, T, T)
    return same & torch.ones(seq_len, seq_len, dtype=torch.bool).tril()


def dense_reference(q, k, v, cu_seqlens, group_size: int, shift: bool) -> torch.Tensor:
    """S²-Attn from an explicit mask: q (B, Hq, T, D), k/v (B, Hk, T, D) -> (B, Hq, T, D)."""
    b, hq, t, _ = q.shape
    mask = group_mask(cu_seqlens, b, t, hq, group_size, shift).to(q.device)
    rep = hq // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


def group_errors(device: torch.device, heads: int, kv_heads: int, seq_len: int, shift: bool, tools) -> dict:
    """Relative errors of the core (bf16, on `device`) against `dense_reference` (float64, CPU)."""
    from longcpt.batch import cu_seqlens_for
    from longcpt.model.attention import AttentionContext
    from longcpt.model.attention.s2.core import S2Attention
    from longcpt.model.config import ModelArgs
    from longcpt.model.rope import RotaryEmbedding

    g = torch.Generator().manual_seed(0)
    rows = [tools.document_lengths(seq_len, g) for _ in range(2)]
    cu = cu_seqlens_for(rows)
    base = [torch.randn(2, h, seq_len, 32, generator=g).bfloat16() for h in (heads, kv_heads, kv_heads)]
    upstream = torch.randn(2, heads, seq_len, 32, generator=g).bfloat16()
    ref_in = [x.double().requires_grad_() for x in base]
    ref = dense_reference(*ref_in, cu, GROUP, shift)
    (ref * upstream.double()).sum().backward()

    args = ModelArgs(vocab_size=8, hidden_size=heads * 32, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=32, attention="s2",
                     attention_options={"group_size": GROUP, "shift": shift})
    core = S2Attention(args, 0)
    xs = [x.to(device).requires_grad_() for x in base]
    rope = RotaryEmbedding(32, 10000.0, None, seq_len, "fp32").to(device)
    positions = torch.zeros(2, seq_len, dtype=torch.long, device=device)  # rotation by 0: the identity
    ctx = AttentionContext(positions, cu.to(device), *rope(positions), rope)
    out = core(*xs, ctx)
    (out * upstream.to(device)).sum().backward()
    errors = {"out": tools.relative_error(out, ref.detach())}
    for name, x, r in zip(("dq", "dk", "dv"), xs, ref_in):
        errors[name] = tools.relative_error(x.grad, r.grad)
    return errors


def check_groups(tools):
    """MHA and GQA, shift on and off: the worst relative error against the tolerance."""
    seq_len = (512 if tools.device.type == "cuda" else 128) // (2 if tools.quick else 1)
    tol = EPS_FACTOR * torch.finfo(torch.bfloat16).eps
    errors = {f"{name} shift={shift}": group_errors(tools.device, h, hk, seq_len, shift, tools)
              for name, h, hk in (("mha", 4, 4), ("gqa", 8, 2)) for shift in (True, False)}
    worst = max(max(e.values()) for e in errors.values())
    line = f"mha/gqa, shift on/off, 1-token docs, G={GROUP}: max error {worst:.1e} (tol {tol:.1e})"
    data = {"errors": errors, "tolerance": tol, "device": str(tools.device)}
    if not worst <= tol:
        return tools.result(tools.KERNELS, "s2 groups", tools.FAIL, line + ": beyond tolerance; report this", data)
    return tools.result(tools.KERNELS, "s2 groups", tools.PASS, line, data)
