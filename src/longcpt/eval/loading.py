"""Load what an evaluation needs: the model and its tokenizer.

`--model` is an exported Hugging Face folder (`longcpt export` writes the tokenizer files next to
the weights, so one folder is enough) or, without exporting first, a training checkpoint: a
`.ckpt` file, a DeepSpeed checkpoint folder or a run folder (its `checkpoints/last`), whose
tokenizer is the one recorded at training time.
Exported models are plain `LlamaForCausalLM`-style folders that run as `full` (a document kind's
model is the same function on one document), or a kind's own export (Infini-attention) that
`longcpt.from_pretrained` reads back as that kind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from longcpt.argtypes import json_object, positive_int
from longcpt.errors import LongcptError


def add_model_arguments(parser: argparse.ArgumentParser, prefill_flag: str = "--prefill-chunk") -> None:
    """The flags every evaluation takes for its model and how it runs (recorded in its outputs):
    --model, --rope-scaling, --attention, --attention-options, and the tokens per model call
    (`prefill_flag`, default `longcpt.model.generation.DEFAULT_PREFILL_CHUNK`)."""
    from longcpt.model.generation import DEFAULT_PREFILL_CHUNK

    parser.add_argument("--model", required=True, help="exported HF folder (or a training checkpoint)")
    parser.add_argument("--rope-scaling", type=json_object, default=None, metavar="JSON",
                        help="replace the model's RoPE scaling at evaluation (training-free context extension), "
                        "e.g. '{\"rope_type\": \"dynamic\", \"factor\": 1.0}'; an exported folder only")
    parser.add_argument("--attention", default=None, metavar="KIND",
                        help="attention kind to run the model with (default: the model's own; e.g. infllm, namm, "
                        "h2o, streaming for an inference-time memory on any softmax model)")
    parser.add_argument("--attention-options", type=json_object, default=None, metavar="JSON",
                        help="options of that kind by name, e.g. '{\"n_local\": 4096, \"topk\": 16}'")
    parser.add_argument(prefill_flag, type=positive_int, default=DEFAULT_PREFILL_CHUNK,
                        help=f"prompt tokens per model call, the state carried across (default: {DEFAULT_PREFILL_CHUNK})")


def model_label(path: str | Path, rope_scaling: dict | None = None, attention: str | None = None) -> str:
    """A short name for figure titles: the folder and its parent, since exports are mostly `.../hf`.

    Example: ("runs/passkey_ft/hf", {"rope_type": "dynamic", "factor": 1.0}, "infllm") ->
    "passkey_ft/hf (infllm), rope dynamic x1.0"; the kind is named when it is not the one the
    model runs as by itself (an inference-time memory, or a training kind asked for explicitly).
    """
    label = "/".join(Path(path).parts[-2:])
    if attention is not None and _named_in_labels(attention):
        label += f" ({attention})"
    if rope_scaling:
        label += f", rope {rope_scaling.get('rope_type', rope_scaling.get('type', '?'))} x{rope_scaling.get('factor', '?')}"
    return label


def _named_in_labels(kind: str) -> bool:
    """Is `kind` a choice on top of the model: an inference-time memory, or a kind whose models
    run as another (`anchor` asked for by name)? A model's own kind goes unnamed."""
    from longcpt.model.attention import kind_spec

    spec = kind_spec(kind)
    return spec.inference_memory or spec.hooks.inference_kind is not None


def load_tokenizer(path: str | Path):
    """The tokenizer stored in a model (or tokenizer) folder.

    Raises:
        LongcptError: no folder, or no loadable tokenizer in it.
    """
    path = Path(path)
    if not path.is_dir():
        raise LongcptError(f"--model {path}: not a folder (pass an exported model folder: longcpt export ... --output DIR)")
    from longcpt.data import load_tokenizer as load

    try:
        return load(str(path))
    except LongcptError as e:
        raise LongcptError(
            f"--model {path}: no usable tokenizer in the folder ({e}); "
            "export with the tokenizer (longcpt export ... --tokenizer DIR) or copy tokenizer.json there"
        ) from None


def load_for_eval(args) -> tuple:
    """`(model, tokenizer, settings)` for an evaluation command's arguments.

    `settings` is what every output JSON records about the model: `model`, `rope_scaling`,
    `attention` and `attention_options` (resolved, defaults included).

    Raises:
        LongcptError: see `load_model_and_tokenizer`.
    """
    attention, options = getattr(args, "attention", None), getattr(args, "attention_options", None) or {}
    model, tokenizer = load_model_and_tokenizer(args.model, args.rope_scaling, attention, options)
    settings = {"model": str(args.model), "rope_scaling": args.rope_scaling, "attention": model.args.attention,
                "attention_options": dict(model.args.attention_options)}
    return model, tokenizer, settings


def load_model_and_tokenizer(
    path: str | Path, rope_scaling: dict | None = None, attention: str | None = None, attention_options: dict | None = None
):
    """`(model, tokenizer)` from an exported folder or a training checkpoint; eval mode, CPU.

    Args:
        path: the `--model` argument.
        rope_scaling: `--rope-scaling`, an HF rope_scaling dict replacing the folder's (training-free
            context extension, e.g. {"rope_type": "dynamic", "factor": 1.0}); exported folders only.
        attention: `--attention`, the kind to run the model with (default: the folder's, `full`
            for plain HF folders; an inference-time memory such as `infllm` applies to any softmax model).
        attention_options: `--attention-options`, that kind's options by name.

    Raises:
        LongcptError: missing folder, config, weights or tokenizer; a bad rope_scaling; an unknown
            kind or option (named).
    """
    from longcpt.model import from_pretrained
    from longcpt.model.attention import resolve_options

    path = Path(path)
    options = dict(attention_options or {})
    if attention is not None:
        resolve_options(attention, options, prefix="--attention-options ")  # checked early, named as typed
    if path.is_dir() and (path / "config.json").is_file():
        model = from_pretrained(path, attention=attention, rope_scaling=rope_scaling, **options)
        return model.eval(), load_tokenizer(path)
    if not path.exists():
        raise LongcptError(f"--model {path}: does not exist (pass an exported model folder or a training checkpoint)")
    if rope_scaling is not None:
        raise LongcptError(f"--rope-scaling applies to exported folders: export {path} first "
                           "(longcpt export CHECKPOINT --output DIR) and evaluate DIR")
    from longcpt.export.convert import find_tokenizer, load_model, resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    model, meta = load_model(checkpoint, for_inference=True, attention=attention, attention_options=options)
    tok_dir = find_tokenizer(checkpoint, meta)
    if tok_dir is None:
        raise LongcptError(f"--model {path}: no tokenizer recorded with the checkpoint; export it with "
                           "`longcpt export ... --tokenizer DIR` and evaluate the folder")
    return model, load_tokenizer(tok_dir)
