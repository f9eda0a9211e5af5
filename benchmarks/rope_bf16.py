"""BF16 breaks RoPE's relative property; fp32 tables and an fp32 rotation keep it (arXiv 2411.13476).

RoPE promises that the score of a query at position m+d and a key at position m depends only on
the distance d. For random q, k (rounded to bf16, as activations are) this script measures, per
window W, the largest change of that score over absolute offsets m in [0, W - d):

    deviation(W) = mean over (q, k) pairs of  max_m |s(m) - s(0)|,   s(m) = <R(m+d) q, R(m) k>

for each way of computing RoPE:
  * bf16 angles         positions and angles in bf16 (a table built after `module.to(bf16)` in
                        older code, or any code where positions follow the model dtype);
  * transformers        transformers' own LlamaRotaryEmbedding + apply_rotary_pos_emb with bf16 q/k:
                        fp32 angles, cos/sin cast to bf16, rotation in bf16;
  * transformers .to(bf16)  the same after `rotary.to(torch.bfloat16)`: inv_freq becomes bf16, so
                        every frequency is off by up to 2^-9 of itself. The relative property
                        survives, but the angles drift from the pretrained model's by up to
                        pos * 2^-9 rad, which the second table shows;
  * ours                longcpt's RotaryEmbedding after `.to(torch.bfloat16)`, rope.precision=fp32:
                        fp32 tables, rotation in fp32, rotated q/k cast to bf16 for the kernel;
  * fp32                q/k, rotation and scores in fp32 (the floor: fp32 angles carry about
                        pos * 2^-24 rad of rounding).
Scores accumulate in fp32 as attention kernels do.

AnchorAttention's part: the first token (BOS) draws the most attention, so the error of its score
matters most. Without the anchor, a document starting at offset s has its BOS at position s and
the query d tokens later at s+d; with AnchorAttention the BOS sits at position 0. The second table
gives the error of that score against the exact value (fp64 rotation of the same q, k with the
model's fp32 frequencies), worst over s.

Run: python benchmarks/rope_bf16.py [--windows 4096,...] [--out docs]
Prints two tables and one JSON line; writes OUT/rope_bf16.png and OUT/rope_bf16.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

from longcpt.model.rope import RotaryEmbedding, apply_rotary, rotate_half  # noqa: E402

BF16 = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Ways of rotating: each maps q, k (P, D) in bf16 and positions of q and k (M,) to rotated
# q, k (P, M, D) in the dtype the attention kernel would see.


def bf16_angles(q, k, pos_q, pos_k, inv_freq):
    def rot(x, pos):
        freqs = pos.to(BF16)[:, None] * inv_freq.to(BF16)[None, :]  # (M, D/2) rounded to bf16
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos(), emb.sin()  # bf16
        x = x[:, None, :]
        return x * cos + rotate_half(x) * sin

    return rot(q, pos_q), rot(k, pos_k)


def transformers_path(rotary: LlamaRotaryEmbedding):
    def run(q, k, pos_q, pos_k, inv_freq):
        cos_q, sin_q = rotary(q, pos_q[None])  # (1, M, D) cast to q.dtype = bf16
        cos_k, sin_k = rotary(k, pos_k[None])
        q_rot, _ = apply_rotary_pos_emb(q[:, None, :], q[:, None, :], cos_q, sin_q, unsqueeze_dim=0)
        _, k_rot = apply_rotary_pos_emb(k[:, None, :], k[:, None, :], cos_k, sin_k, unsqueeze_dim=0)
        return q_rot[0] if q_rot.dim() == 4 else q_rot, k_rot[0] if k_rot.dim() == 4 else k_rot

    return run


def ours(rope: RotaryEmbedding):
    def run(q, k, pos_q, pos_k, inv_freq):
        cos_q, sin_q = rope(pos_q[None])  # (1, M, D) float32 whatever the module was cast to
        cos_k, sin_k = rope(pos_k[None])
        # apply_rotary takes (B, H, T, D): pairs as the batch, one head.
        q_rot, _ = apply_rotary(q[:, None, None, :], q[:, None, None, :], cos_q, sin_q, "fp32")
        _, k_rot = apply_rotary(k[:, None, None, :], k[:, None, None, :], cos_k, sin_k, "fp32")
        return q_rot[:, 0], k_rot[:, 0]

    return run


def fp32(rope: RotaryEmbedding):
    inner = ours(rope)

    def run(q, k, pos_q, pos_k, inv_freq):
        return inner(q.float(), k.float(), pos_q, pos_k, inv_freq)

    return run


def exact(q, k, pos_q, pos_k, inv_freq):
    """fp64 rotation with the model's (fp32) frequencies."""

    def rot(x, pos):
        freqs = pos.double()[:, None] * inv_freq.double()[None, :]
        emb = torch.cat((freqs, freqs), -1)
        x = x.double()[:, None, :]
        return x * emb.cos() + rotate_half(x) * emb.sin()

    return rot(q, pos_q), rot(k, pos_k)


def scores(method, q, k, pos_q, pos_k, inv_freq) -> torch.Tensor:
    q_rot, k_rot = method(q, k, pos_q, pos_k, inv_freq)
    acc = torch.float64 if q_rot.dtype == torch.float64 else torch.float32
    return (q_rot.to(acc) * k_rot.to(acc)).sum(-1)  # (P, M)


# ---------------------------------------------------------------------------------------------


def measure(args) -> dict:
    torch.manual_seed(args.seed)
    d = args.head_dim
    q = torch.randn(args.pairs, d).to(BF16)
    k = torch.randn(args.pairs, d).to(BF16)
    rope = RotaryEmbedding(d, args.theta, max_position_embeddings=max(args.windows)).to(BF16)
    inv_freq = rope.inv_freq  # fp32 even after the cast (the fix)
    cfg = LlamaConfig(hidden_size=d * 8, num_attention_heads=8, head_dim=d, rope_theta=args.theta)
    hf = LlamaRotaryEmbedding(cfg)
    hf_cast = LlamaRotaryEmbedding(cfg).to(BF16)
    methods = {
        "bf16 angles": bf16_angles,
        "transformers": transformers_path(hf),
        "transformers .to(bf16)": transformers_path(hf_cast),
        "ours (fp32 rotation)": ours(rope),
        "fp32": fp32(rope),
    }
    dist = args.distance
    relative: dict[str, list[float]] = {name: [] for name in methods}
    first: dict[str, list[float]] = {}
    for w in args.windows:
        offsets = torch.unique(torch.linspace(0, w - dist - 1, args.offsets).round().long())
        for name, method in methods.items():
            s = scores(method, q, k, offsets + dist, offsets, inv_freq)
            relative[name].append((s - s[:, :1]).abs().amax(1).mean().item())
        # The first token's score: BOS at its document's offset (no anchor) or at 0 (anchor).
        for name in ("transformers", "transformers .to(bf16)", "ours (fp32 rotation)"):
            method = methods[name]
            for label, pos_k in (("BOS at offset", offsets), ("BOS anchor at 0", torch.zeros_like(offsets))):
                s = scores(method, q, k, offsets + dist, pos_k, inv_freq)
                ref = scores(exact, q, k, offsets + dist, pos_k, inv_freq)
                first.setdefault(f"{name}, {label}", []).append((s - ref).abs().amax(1).mean().item())
    spread = scores(exact, q, k, torch.tensor([dist]), torch.tensor([0]), inv_freq).std().item()
    return {"windows": args.windows, "relative": relative, "first_token": first, "score_std": spread}


def table(title: str, rows: dict[str, list[float]], windows: list[int]) -> str:
    head = "| " + title + " | " + " | ".join(f"{w // 1024}K" for w in windows) + " |"
    sep = "|---|" + "---:|" * len(windows)
    body = [f"| {name} | " + " | ".join(f"{v:.3g}" for v in vals) + " |" for name, vals in rows.items()]
    return "\n".join([head, sep, *body])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    windows = result["windows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {  # (color, marker, line) per method, so the two panels read together
        "bf16 angles": ("tab:red", "o", "-"),
        "transformers": ("tab:blue", "s", "-"),
        "transformers .to(bf16)": ("tab:cyan", "x", ":"),
        "ours (fp32 rotation)": ("tab:green", "o", "-"),
        "fp32": ("tab:gray", "^", "-"),
    }
    for name, vals in result["relative"].items():
        color, marker, line = styles[name]
        axes[0].plot(windows, vals, line, color=color, marker=marker, label=name)
    axes[0].set(yscale="log", ylabel="max over offsets |s(m) - s(0)|", title="Relative-position deviation of q.k")
    for name, vals in result["first_token"].items():
        method, where = name.split(", ")
        if ".to(bf16)" in method:  # frequency drift, orders of magnitude off this panel's scale
            continue
        color, marker, _ = styles[method]
        axes[1].plot(windows, vals, "--" if "anchor" in where else "-", color=color, marker=marker, label=name)
    axes[1].set(ylim=(0, None), ylabel="max |s - exact|", title="Error of the first token's score")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(windows, [f"{w // 1024}K" for w in windows])
        ax.set_xlabel("window (tokens)")
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"RoPE under bf16: random q, k (head dim 128), score std {result['score_std']:.1f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", default="4096,8192,16384,32768,65536")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--theta", type=float, default=10000.0)
    p.add_argument("--pairs", type=int, default=128, help="random (q, k) pairs")
    p.add_argument("--offsets", type=int, default=512, help="absolute offsets per window")
    p.add_argument("--distance", type=int, default=64, help="fixed relative distance d")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    args = p.parse_args(argv)
    args.windows = [int(w) for w in args.windows.split(",")]

    result = measure(args)
    w = args.windows
    rel = result["relative"]
    ratio = {"transformers / ours": [a / b for a, b in zip(rel["transformers"], rel["ours (fp32 rotation)"])]}
    t1 = table(f"deviation at distance {args.distance}", {**rel, **ratio}, w)
    t2 = table("first token's score error", result["first_token"], w)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "rope_bf16.png")
    note = (
        f"head dim {args.head_dim}, theta {args.theta:g}, {args.pairs} random (q, k) pairs in bf16, "
        f"score std {result['score_std']:.1f}; `python benchmarks/rope_bf16.py`"
    )
    (out / "rope_bf16.md").write_text(f"{t1}\n\n{t2}\n\n{note}\n")
    print(t1, t2, note, sep="\n\n")
    worst = min(ratio["transformers / ours"])
    verdict = {
        "ours_vs_transformers_min_ratio": worst,
        "target_1p5x": worst >= 1.5,
        "bf16_angles_vs_ours_min_ratio": min(
            a / b for a, b in zip(rel["bf16 angles"], rel["ours (fp32 rotation)"])
        ),
    }
    print("target: ours >= 1.5x below transformers at every window:", "met" if worst >= 1.5 else "NOT met")
    print(json.dumps({"benchmark": "rope_bf16", **result, **verdict}, default=lambda x: round(x, 6)))
    return result


if __name__ == "__main__":
    main()
