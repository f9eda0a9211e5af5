"""Training checkpoint -> HF folder (`longcpt export`, `longcpt.export.command`).

CHECKPOINT may be
  * a Lightning `.ckpt` file (single process or DDP),
  * a DeepSpeed ZeRO-2/3 checkpoint folder (Lightning names it `step-*.ckpt` too): consolidated on
    the CPU with DeepSpeed's own `zero_to_fp32` from the fp32 master weights, no GPU needed,
  * `checkpoints/last`, a `checkpoints/` folder or a run folder (`trainer.out_dir`): its `last`.

Every longcpt checkpoint carries what is needed to rebuild the model without the recipe
(`LitCausalLM.checkpoint_metadata`: architecture, attention kind, precision, tokenizer folder).
The folder is written by `longcpt.save_pretrained`, so it is what docs/reference.md describes and
loads in plain `transformers.AutoModelForCausalLM`. The default dtype is the one the weights were
trained in: bfloat16 for `bf16-true` runs, else the float32 master weights.

A LoRA checkpoint (`model.lora`) holds only what was trained; its frozen weights are read again
from the base folder it records (checked against the recorded fingerprint), the adapters are
merged into them (`longcpt.lora.adapters.merge`), and the folder is a plain one. `--adapter-only`
writes a peft adapter folder instead (`longcpt.export.adapter`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from longcpt.errors import LongcptError
from longcpt.manifest import verify

CHECKPOINT_KEY = "longcpt"  # same as longcpt.lit.module.CHECKPOINT_KEY (kept import-light here)
# Prefixes wrappers add to parameter names: Lightning's module wrapper, then our LightningModule's
# `model` attribute.
_WRAPPER_PREFIXES = ("_forward_module.", "module.")
_MODULE_PREFIX = "model."


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file/folder that `path` names (following `last`).

    Raises:
        LongcptError: nothing there, or a folder that is neither a checkpoint nor holds one.
    """
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise LongcptError(f"checkpoint {p} does not exist (pass a .ckpt file, a DeepSpeed folder or a run folder)")
    if p.is_dir() and not is_deepspeed_checkpoint(p):  # a run folder or its checkpoints/ folder
        for candidate in (p / "checkpoints" / "last", p / "last"):
            if candidate.exists() or candidate.is_symlink():
                p = candidate
                break
    real = Path(os.path.realpath(p))
    if not real.exists():
        raise LongcptError(f"checkpoint {p} points to {real}, which does not exist")
    if real.is_dir() and not is_deepspeed_checkpoint(real):
        raise LongcptError(
            f"{real} is a folder but not a DeepSpeed checkpoint (no 'latest' file) nor a run folder "
            "(no checkpoints/last); pass a .ckpt file, a DeepSpeed checkpoint folder or a run's out_dir"
        )
    return real


def is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "latest").is_file()


def _strip(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    if not name.startswith(_MODULE_PREFIX):
        raise LongcptError(f"unexpected parameter name {name!r} in the checkpoint (not a longcpt training checkpoint?)")
    return name[len(_MODULE_PREFIX) :]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model weights (HF parameter names, full tensors on CPU) and longcpt metadata of a checkpoint.

    A LoRA checkpoint holds only the tensors it trained (`merged_state` makes the whole model).

    Raises:
        LongcptError: not a longcpt checkpoint, or unreadable.
    """
    path = resolve_checkpoint(path)
    # A damaged file can still unpickle (torch.load reads no checksums): check it against its
    # manifest, or its zip CRCs when it has none, before its weights go anywhere.
    problems = verify(path)
    if problems:
        raise LongcptError(f"{path} is damaged: {'; '.join(problems)}. Use an earlier checkpoint "
                           f"(the other step-*.ckpt in {path.parent})")
    if is_deepspeed_checkpoint(path):
        state, client = _read_deepspeed(path)
    else:
        # Our own training output (Lightning's checkpoint format holds non-tensor training state).
        try:
            client = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # a truncated or foreign file: name it
            raise LongcptError(f"{path}: cannot read as a Lightning checkpoint ({type(e).__name__}: {e})") from None
        state = client.get("state_dict", {})
    meta = client.get(CHECKPOINT_KEY)
    if meta is None:
        raise LongcptError(f"{path}: no '{CHECKPOINT_KEY}' metadata; it was not written by `longcpt train`")
    return {_strip(k): v for k, v in state.items()}, meta


def merged_state(state: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The whole model's weights (float32, base parameter names) of a LoRA checkpoint: the base folder
    it records, with the trained tensors loaded and the adapters merged in.

    Raises:
        LongcptError: the base folder is missing or not the one trained on, or the tensors do not fit.
    """
    from longcpt.lora.adapters import apply_lora, check_base, load_trained, merge
    from longcpt.lora.config import LoraConfig
    from longcpt.model.config import ModelArgs
    from longcpt.model.hf_io import load_pretrained

    lora = meta["lora"]
    check_base(lora["base"], lora["fingerprint"], source)
    model = load_pretrained(lora["base"], ModelArgs(**meta["model_args"]), dtype="fp32")
    tuner = apply_lora(model, LoraConfig(**lora["settings"]))
    load_trained(model, {k: v.float() for k, v in state.items()}, source)
    return merge(tuner).state_dict()


def _read_deepspeed(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Consolidate ZeRO-2/3 shards with DeepSpeed's zero_to_fp32 (CPU only) + read the client state."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (path / "latest").read_text().strip()
    state_files = sorted((path / tag).glob("*model_states.pt"))
    if not state_files:
        raise LongcptError(f"{path / tag}: no *model_states.pt file; the DeepSpeed checkpoint is incomplete")
    # Lightning stores its training state (and ours) as DeepSpeed client state in every rank's
    # model-states file; rank 0's is enough. Trusted: our own training output.
    client = torch.load(state_files[0], map_location="cpu", weights_only=False)
    lora = (client.get(CHECKPOINT_KEY) or {}).get("lora") is not None  # saved without its frozen weights
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag, exclude_frozen_parameters=lora)
    return state, client


def load_model(
    checkpoint: str | os.PathLike, for_inference: bool = False, attention: str | None = None,
    attention_options: dict | None = None,
):
    """A longcpt `CausalLM` (float32, CPU) from a training checkpoint, plus the checkpoint metadata.

    Evaluation uses this to accept checkpoints where an HF folder is expected.

    Args:
        checkpoint: a .ckpt file, DeepSpeed folder or run folder (`resolve_checkpoint`).
        for_inference: run the model as its kind's inference kind (`anchor`/`intra_doc` models as
            `full`: the same function on one document, with a KV cache for generation), as their
            HF exports do.
        attention, attention_options: run the model with this kind instead (an inference-time
            memory on a softmax model, say).

    Raises:
        LongcptError: an unreadable checkpoint, or a kind that cannot apply to the model.
    """
    from longcpt.model.attention import inference_kind, kind_spec, switch_problem
    from longcpt.model.config import ModelArgs
    from longcpt.model.hf_io import build_model

    path = resolve_checkpoint(checkpoint)
    state, meta = read_checkpoint(path)
    if meta.get("lora") is not None:  # the frozen base, the trained tensors, merged
        state = merged_state(state, meta, str(path))
    args = ModelArgs(**meta["model_args"])
    trained = kind_spec(args.attention)
    # Checkpoints of longcpt 0.1 recorded the Infini options whatever the kind: keep the kind's own.
    kind, options = trained.name, {k: v for k, v in args.attention_options.items() if k in trained.options}
    if for_inference and inference_kind(kind) != kind:
        kind, options = inference_kind(kind), {}
    if attention is not None and attention != kind:
        problem = switch_problem(trained.name, attention)
        if problem is not None:
            raise LongcptError(f"{path}: {problem}")
        state = {k: v for k, v in state.items() if not trained.own_parameter(k)}
        kind, options = attention, dict(attention_options or {})
    elif attention_options:
        options = {**options, **attention_options}
    args = args.run_as(kind, options, args.rope_precision)
    model = build_model(args, {k: v.float() for k, v in state.items()}, source=str(path))
    return model.eval(), meta


def find_tokenizer(path: Path, meta: dict[str, Any]) -> Path | None:
    """The tokenizer recorded at training time, else the run folder's copy (the run may have moved)."""
    for c in (meta.get("tokenizer"), path.parent.parent / "tokenizer"):
        if c and any((Path(c) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            return Path(c)
    return None


def default_dtype(meta: dict[str, Any]) -> str:
    return "bf16" if meta.get("precision") == "bf16-true" else "fp32"


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Write the Hugging Face folder of a training checkpoint (atomically).

    Args:
        checkpoint: `.ckpt` file, DeepSpeed folder, `last`, or run folder.
        output: HF folder to write.
        dtype: "bf16" | "fp16" | "fp32"; default `default_dtype` (as trained).
        tokenizer: tokenizer folder to copy; default the one recorded in the checkpoint.

    Returns:
        The output folder.

    Raises:
        LongcptError: unreadable checkpoint, no tokenizer found, or a tokenizer larger than the
            embedding matrix.
    """
    from longcpt.export.hf import save_pretrained

    path = resolve_checkpoint(checkpoint)
    model, meta = load_model(path)
    tok = Path(tokenizer) if tokenizer is not None else find_tokenizer(path, meta)
    if tok is None:
        raise LongcptError(
            f"{path}: no tokenizer found (looked at {meta.get('tokenizer')} and the run's tokenizer/ folder); "
            "pass --tokenizer DIR"
        )
    return save_pretrained(model, output, dtype=dtype or default_dtype(meta), tokenizer=tok)
