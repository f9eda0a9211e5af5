"""From a resolved recipe to the model's constructor arguments: the one path, used by every command.

    args = model_args(cfg)             # plan, doctor: no weights read, no tokenizer loaded
    args = model_args(cfg, tokenizer)  # train: a model from scratch takes the tokenizer's ids

The architecture comes from `model.pretrained`'s config.json (a kind's own export included:
`longcpt.model.hf_io.folder_args`) or from `model.config` with the tokenizer's vocabulary, then
the `rope:` section's overrides (`rope.theta`, `rope.scaling`); the runtime choices, which are not
part of the Hugging Face architecture, are added once (`ModelArgs.run_as`): `attention.kind`, its
options as `longcpt.config.resolve` completed them, and `rope.precision`.
"""

from __future__ import annotations

from pathlib import Path

from longcpt.errors import LongcptError
from longcpt.model.config import ModelArgs


def model_args(cfg, tokenizer=None) -> ModelArgs:
    """The `ModelArgs` `longcpt train` builds for the resolved recipe `cfg` (pure: reads only config
    files; the weights are `longcpt.model.hf_io.load_pretrained`'s).

    Args:
        cfg: a resolved recipe (`longcpt.config.load_config`).
        tokenizer: the run's tokenizer; a model from `model.config` takes its size and special ids.
            Without it the size is read from `model.tokenizer`'s tokenizer.json.

    Raises:
        LongcptError: `model.pretrained` has no readable config.json, or `model.config` misses a
            field (the vocabulary size included), each naming the key and the fix.
    """
    m, rope, attention = cfg.model, cfg.rope, cfg.attention
    if m.pretrained is not None:
        from longcpt.model.hf_io import folder_args

        if not (Path(m.pretrained) / "config.json").is_file():
            raise LongcptError(
                f"model.pretrained={m.pretrained!r}: no config.json there; the model's shape is read from it "
                "(the weights are not needed to plan): point model.pretrained at the model folder, or at any "
                "folder holding its config.json"
            )
        return folder_args(m.pretrained, attention.kind, rope.precision, rope.theta, rope.scaling, **attention.options)
    architecture = _scratch_architecture(m, tokenizer).with_rope(rope.theta, rope.scaling, source="rope.scaling")
    return architecture.run_as(attention.kind, attention.options, rope.precision)


def _scratch_architecture(m, tokenizer) -> ModelArgs:
    """`model.config` as HF fields, completed with the tokenizer's vocabulary size and special ids."""
    if tokenizer is not None:
        ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    else:
        ids = {"vocab_size": _tokenizer_size(m.tokenizer)}
    hf = {**ids, **m.config}
    try:
        args = ModelArgs.from_hf_config(hf, source="model.config")
    except KeyError as e:
        raise LongcptError(f"model.config: missing field {e.args[0]!r} (an HF config.json field)") from None
    if args.vocab_size is None:
        raise LongcptError(
            f"model.config has no vocab_size and model.tokenizer={m.tokenizer!r} has no tokenizer.json to take "
            "it from: set model.config.vocab_size=N (or point model.tokenizer at the tokenizer folder)")
    return args


def _tokenizer_size(folder: str | None) -> int | None:
    """Tokens of a tokenizer folder (added tokens included), as a model built from scratch gets."""
    file = Path(folder or "") / "tokenizer.json"
    if folder is None or not file.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
