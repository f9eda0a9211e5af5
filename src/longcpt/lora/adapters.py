"""Adapters on a `CausalLM` through peft: inject, train what the recipe says, merge (`longcpt.lora`)."""


from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longcpt.errors import LongcptError
from longcpt.lora.config import LoraConfig

ADAPTER = "default"  # peft's adapter name: parameters are `<module>.lora_A.default.weight`
# Parameters of the base model's layers, the checkpoint's fingerprint of the folder it adapted.
_FINGERPRINT = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight")


def matches(module: str, entries: Iterable[str]) -> bool:
    """Does an entry of `targets` / `trainable` name `module` (peft's rule: the name, or its end
    after a dot)?"""
    return any(module == e or module.endswith("." + e) for e in entries)


def peft_config(lora: LoraConfig, **extra: Any):
    """The `peft.LoraConfig` of the section (`extra`: further peft fields, e.g. for an export)."""
    import peft

    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=list(lora.targets), bias="none", **extra)


def apply_lora(model: nn.Module, lora: LoraConfig, seed: int = 0):
    """Inject adapters into `model` in place and leave trainable only what the section says.

    Args:
        model: a `CausalLM` (its parameters may be ZeRO-3 partitions; call this outside
            `deepspeed.zero.Init`, `longcpt.strategies.outside_zero_init`).
        lora: the `model.lora` section.
        seed: the adapters' initial values are drawn from this seed alone (torch's generator is left
            as it was), so every strategy starts from the same adapters whatever it drew before
            (ZeRO-3 builds the model after DeepSpeed's setup, DDP before).

    Returns:
        The `peft.LoraModel` around `model` (`merge` needs it); `model.lora` is set to `lora`.

    Raises:
        LongcptError: a target or trainable module the model does not have, or a trainable module
            holding adapters.
    """
    import peft

    from longcpt.model.attention import kind_spec

    modules = [name for name, _ in model.named_modules()]
    _check_names(modules, lora)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tuner = peft.LoraModel(model, peft_config(lora), ADAPTER)  # freezes every non-adapter parameter
    except ValueError as e:
        raise LongcptError(f"model.lora.targets={lora.targets}: {e}") from None
    spec = kind_spec(model.args.attention)
    for name, module in model.named_modules():
        if matches(name, lora.trainable):
            adapted = [n for n, _ in module.named_parameters() if "lora_" in n or "base_layer" in n]
            if adapted:
                raise LongcptError(f"model.lora.trainable: {name!r} holds adapted layers ({adapted[0]}); train its "
                                   "other modules by name instead")
            module.requires_grad_(True)
    for name, p in model.named_parameters():
        if spec.own_parameter(name):  # the kind's own (Infini's gates): new, so trained
            p.requires_grad_(True)
    # What is trained in float32 (the optimizer's masters; frozen weights keep their dtype). Under
    # ZeRO-3 the new adapters take the partitions' dtype instead: DeepSpeed keeps the float32 masters
    # itself and flattens every trained partition into one buffer of one dtype.
    partitions = next((p.dtype for p in model.parameters() if hasattr(p, "ds_id")), None)
    for p in model.parameters():
        if p.requires_grad and not hasattr(p, "ds_id") and p.dtype != (partitions or torch.float32):
            p.data = p.data.to(partitions or torch.float32)
    model.lora = lora
    return tuner


def _check_names(modules: list[str], lora: LoraConfig) -> None:
    """Every `trainable` entry names a module (peft checks `targets` itself)."""
    missing = [e for e in lora.trainable if not matches_any(modules, e)]
    if missing:
        short = sorted({m.split(".")[-1] for m in modules if m and not m.split(".")[-1].isdigit()})
        raise LongcptError(f"model.lora.trainable: {missing} name no module of this model; module names: "
                           f"{', '.join(short)}")


def matches_any(modules: Iterable[str], entry: str) -> bool:
    return any(matches(m, [entry]) for m in modules)


def trained_names(model: nn.Module) -> list[str]:
    """Names of the parameters a LoRA run trains (and its checkpoints hold)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def adapter_summary(model: nn.Module) -> str:
    """`trainable 1.2M of 7.0B parameters (0.02%)`, for the run's log."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return f"LoRA: training {trained:,} of {total:,} parameters ({100 * trained / max(total, 1):.2f}%)"


def load_trained(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a LoRA checkpoint's tensors (`trained_names`) into an adapted model, exactly those.

    Raises:
        LongcptError: a trained parameter missing from `state`, or a tensor the model does not train.
    """
    expected = set(trained_names(model))
    missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unknown:
        raise LongcptError(f"{source}: the checkpoint does not hold what this LoRA model trains: missing "
                           f"{missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected {unknown[:4]}"
                           f"{' ...' if len(unknown) > 4 else ''}")
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


def merge(tuner) -> nn.Module:
    """The model with every adapter added into its weights (W + alpha/r B A) and removed: a plain
    `CausalLM` with the base model's parameter names (`peft.LoraModel.merge_and_unload`)."""
    model = tuner.merge_and_unload(safe_merge=True)
    model.lora = None
    return model


def base_fingerprint(folder: str | Path | None) -> dict[str, float]:
    """Sums (float64) of a few base weights, read from the folder's files: a checkpoint records them so
    that exporting or resuming on another folder of the same shape is an error, not silent garbage."""
    from longcpt.model.hf_io import WeightFiles

    if folder is None or not (Path(folder) / "config.json").is_file():
        return {}
    weights = WeightFiles(folder)
    return {name: float(weights[name].double().sum()) for name in _FINGERPRINT if name in weights}


def check_base(folder: str | Path, recorded: dict[str, float], where: str) -> None:
    """Raise when `folder`'s weights are not those `recorded` (`base_fingerprint`) by the run.

    Raises:
        LongcptError: naming the folder, the weight that differs and the fix.
    """
    now = base_fingerprint(folder)
    for name, value in recorded.items():
        if name not in now or not math.isclose(now[name], value, rel_tol=1e-9, abs_tol=1e-9):
            raise LongcptError(f"{where}: the LoRA base {folder} is not the folder the adapters were trained on "
                               f"({name} sums to {now.get(name)} there, {value} at training time). Point "
                               "model.pretrained (or --base) at the original base model")


def record(lora: LoraConfig, base: str) -> dict[str, Any]:
    """What a LoRA checkpoint carries besides its tensors: the section, the base folder (absolute) and
    its fingerprint, so that export and resume rebuild the same frozen model."""
    return {"settings": lora.as_dict(), "base": str(Path(base).resolve()), "fingerprint": base_fingerprint(base)}


def check_resume(saved: dict[str, Any] | None, lora: LoraConfig | None, base: str | None,
                 keys: set[str] | None, expected: set[str] | None) -> None:
    """Refuse to resume a checkpoint that another kind of run wrote.

    Args:
        saved: the checkpoint's LoRA record (`record`), None for full fine-tuning.
        lora: this run's `model.lora` section, None for full fine-tuning.
        base: this run's `model.pretrained`.
        keys: the tensor names of a Lightning checkpoint's state dict (None: DeepSpeed restores its own).
        expected: the names this run trains (with LoRA).

    Raises:
        LongcptError: full fine-tuning against LoRA either way, other LoRA settings, another base
            folder, or tensors that are not exactly the trained ones; each with the fix.
    """
    fix = "start a new run (another trainer.out_dir, or trainer.resume=false) or restore the recipe it was written with"
    if saved is None and lora is None:
        return
    if saved is None or lora is None:
        what = "full fine-tuning" if saved is None else "LoRA"
        raise LongcptError(f"the checkpoint to resume was written by {what} training and this recipe "
                           f"{'sets' if lora is not None else 'has no'} model.lora: {fix}")
    if saved["settings"] != lora.as_dict():
        raise LongcptError(f"the checkpoint to resume was trained with model.lora={saved['settings']}, this recipe "
                           f"has {lora.as_dict()}: {fix}")
    check_base(base, saved["fingerprint"], "resume")
    if keys is not None and keys != expected:
        raise LongcptError(f"the checkpoint holds {sorted(keys - expected)[:4]} beyond and lacks "
                           f"{sorted(expected - keys)[:4]} of what this LoRA run trains: {fix}")
