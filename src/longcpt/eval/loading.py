"""Load what an evaluation needs from an exported Hugging Face folder: the model and its tokenizer.

`longcpt export` writes the tokenizer files next to the weights, so one folder is enough.
Exported `full`, `intra_doc` and `anchor` models are plain `LlamaForCausalLM`-style folders and
run as `full` (the same function for one document); Infini-attention exports load through the
same `longcpt.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from longcpt.errors import LongcptError


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


def load_model_and_tokenizer(path: str | Path):
    """`(model, tokenizer)` from an exported folder; the model in eval mode on the CPU.

    Raises:
        LongcptError: missing folder, config, weights or tokenizer.
    """
    from longcpt.model import from_pretrained

    tokenizer = load_tokenizer(path)
    model = from_pretrained(path).eval()
    return model, tokenizer
