"""Optional fused kernels for training on CUDA GPUs (`model.fused_kernels`).

`liger`: Liger Kernel's Triton kernels (https://github.com/linkedin/Liger-Kernel, `pip install
liger-kernel`) for two pieces of every block, each with the numerics of the eager code it replaces:

  * RMSNorm, in Liger's "llama" casting mode: the inverse RMS in float32, the normalised input cast
    back to the input's dtype, then scaled by the weight, which is `longcpt.model.llama.RMSNorm`'s
    (and transformers' Llama's) order;
  * SwiGLU's silu(gate) * up, one kernel instead of three element-wise passes over (n, F).

RoPE stays longcpt's own. Liger's RoPE kernel rotates q and k in their own dtype, bf16 in training,
while `rope.precision: fp32` (the default) rotates them in float32: the BF16 RoPE fix, whose error at
long positions is measured in docs/rope_bf16.md. Liger's fused linear cross-entropy is not used either:
`longcpt.model.loss` already computes the loss over chunks of the vocabulary without the whole
(n, V) logits.

`longcpt doctor` compares the fused model with the eager one on the GPU (`check`): loss and
gradients of a tiny model in bf16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from longcpt.errors import LongcptError

FUSED_KERNELS = ("none", "liger")


def fused_kernels_problems(name: str, accelerator: str) -> list[str]:
    """What is wrong with `model.fused_kernels` for a run on `accelerator` (cpu, gpu or auto)."""
    if name not in FUSED_KERNELS:
        return [f"model.fused_kernels={name!r}: must be one of {', '.join(FUSED_KERNELS)}"]
    if name == "liger" and accelerator == "cpu":
        return ["model.fused_kernels=liger: Liger Kernel's kernels are Triton kernels for CUDA GPUs, and "
                "trainer.accelerator=cpu; use model.fused_kernels=none on a CPU"]
    return []


def liger_functions() -> tuple[Callable, Callable]:
    """Liger's (rms_norm(x, weight, eps), silu_mul(gate, up)).

    Raises:
        LongcptError: no CUDA GPU here, or Liger Kernel is not installed.
    """
    if not torch.cuda.is_available():
        raise LongcptError("model.fused_kernels=liger: Liger Kernel's kernels run on CUDA GPUs and there is none "
                           "here; use model.fused_kernels=none")
    try:
        from liger_kernel.transformers.functional import liger_rms_norm, liger_swiglu
    except ImportError as e:
        raise LongcptError(f"model.fused_kernels=liger: Liger Kernel is not importable ({e}); "
                           "pip install liger-kernel (or the extra: pip install -e '.[gpu]'), "
                           "or use model.fused_kernels=none") from e

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # in_place=False: the backward writes its own buffer, not the incoming gradient, which
        # activation checkpointing and the residual stream may still read.
        return liger_rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=False)

    return rms_norm, liger_swiglu


def apply_fused_kernels(model: nn.Module, name: str, functions: tuple[Callable, Callable] | None = None) -> int:
    """Route every RMSNorm and SwiGLU of `model` through the fused kernels `name` names.

    Args:
        model: a `CausalLM` (or any module holding longcpt's `RMSNorm` and `MLP`, peft-wrapped too).
        name: `model.fused_kernels`: none (nothing changes) or liger.
        functions: (rms_norm, silu_mul) to use instead of Liger's (tests).

    Returns:
        How many modules now run a fused kernel.

    Raises:
        LongcptError: see `liger_functions`.
    """
    from longcpt.model.llama import MLP, RMSNorm

    if name == "none":
        return 0
    rms_norm, silu_mul = functions or liger_functions()
    count = 0
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.kernel = rms_norm
            count += 1
        elif isinstance(module, MLP):
            module.silu_mul = silu_mul
            count += 1
    return count


def check(device: torch.device):
    """`longcpt doctor`: a tiny Llama's bf16 loss and gradients with Liger's kernels against the
    same model eager, on the GPU. Returns (status, detail)."""
    if device.type != "cuda":
        return "SKIP", "Liger Kernel runs on CUDA GPUs only"
    try:
        functions = liger_functions()
    except LongcptError as e:
        return "FAIL", str(e)
    from longcpt.model.attention import DEFAULT_KIND
    from longcpt.model.config import ModelArgs
    from longcpt.model.llama import CausalLM

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                     attention=DEFAULT_KIND)
    eager = CausalLM(args).to(device, torch.bfloat16)
    fused = CausalLM(args).to(device, torch.bfloat16)
    fused.load_state_dict(eager.state_dict())
    apply_fused_kernels(fused, "liger", functions)
    ids = torch.randint(0, 256, (2, 256), device=device)
    losses, grads = [], []
    for model in (eager, fused):
        loss = model.loss(ids, ids)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters()]))
    loss_error = abs(losses[0] - losses[1])
    grad_error = ((grads[0] - grads[1]).norm() / grads[0].norm()).item()
    ok = loss_error < 2e-2 and grad_error < 5e-2  # bf16 rounding: a wrong kernel moves both by far more
    return ("PASS" if ok else "FAIL"), (f"bf16 loss {losses[1]:.4f} vs eager {losses[0]:.4f} (|diff| {loss_error:.1e}), "
                                         f"gradient relative error {grad_error:.1e}")
