"""Training a byte-level BPE tokenizer, and loading tokenizers with BOS/EOS/PAD guaranteed.

`train_tokenizer` writes a folder that plain `transformers.AutoTokenizer.from_pretrained(DIR)`
loads (tokenizer.json + tokenizer_config.json, class `PreTrainedTokenizerFast`, so transformers 4
and 5 both read it). Like Llama's tokenizer it prepends BOS when called with the default
`add_special_tokens=True`; corpus preparation encodes without special tokens and packing adds
BOS/EOS itself.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from longcpt.data.records import Rejection, expand_inputs, iter_records
from longcpt.errors import LongcptError
from longcpt.fsio import atomic_dir

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # ids 0, 1, 2 (Llama's BOS/EOS spelling)
MIN_VOCAB = 256 + 3  # every byte plus the three special tokens


def train_tokenizer(
    inputs: Sequence[str | Path],
    vocab_size: int,
    output: str | Path,
    *,
    text_field: str = "text",
    min_frequency: int = 2,
    split_digits: bool = False,
) -> dict:
    """Train a byte-level BPE tokenizer on text records and save it as a Hugging Face folder.

    Args:
        inputs: files, folders or globs (`.jsonl`, `.json`, `.parquet`, `.txt`), streamed.
        vocab_size: target vocabulary size, special tokens included (>= 259).
        output: folder to write (appears only when complete).
        text_field: field holding the text in JSON/Parquet records.
        min_frequency: minimum pair count for a merge.
        split_digits: every digit is a token of its own, as in Llama's and Mistral's tokenizers
            (numbers are then spelled digit by digit: a model copies a passkey or a RULER value
            one digit per token, whatever merges the corpus would have made).

    Returns:
        A summary: `{"output", "vocab_size", "records", "rejected", "bos_id", "eos_id", "pad_id"}`.

    Raises:
        LongcptError: vocab_size too small, a missing input, or no usable record at all.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB:
        raise LongcptError(f"--vocab-size {vocab_size}: must be >= {MIN_VOCAB} (256 bytes + 3 special tokens)")
    files = expand_inputs(inputs)
    rejected: list[Rejection] = []
    count = [0]

    def texts() -> Iterator[str]:
        for text, _, _ in iter_records(files, text_field, rejected.append):
            count[0] += 1
            yield text

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte encodes: no unknown token
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer)
    if count[0] == 0:
        raise LongcptError(f"no usable text record in {', '.join(map(str, files))} "
                           f"({len(rejected)} rejected; first: {rejected[0].location}: {rejected[0].detail})"
                           if rejected else f"no text record in {', '.join(map(str, files))}")
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": 1 << 30,
        "clean_up_tokenization_spaces": False,
    }
    with atomic_dir(output) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(
            json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n"
        )
    for r in rejected[:5]:
        warnings.warn(f"skipped {r.location}: {r.detail}", stacklevel=2)
    return {
        "output": str(output),
        "vocab_size": tok.get_vocab_size(),
        "records": count[0],
        "rejected": len(rejected),
        "bos_id": bos_id,
        "eos_id": tok.token_to_id(EOS),
        "pad_id": tok.token_to_id(PAD),
    }


def load_tokenizer(path: str | Path):
    """Load a fast tokenizer folder (ours or a real Hugging Face one) with BOS/EOS/PAD ids set.

    Packing needs all three. A tokenizer without PAD (Llama 2/3) pads with EOS; one without BOS
    (Qwen2) uses EOS as the document separator and anchor, as Qwen's own packing does; both are
    reported with a warning.

    Args:
        path: folder with tokenizer.json (and usually tokenizer_config.json).

    Returns:
        A `transformers` fast tokenizer whose `bos_token_id`, `eos_token_id`, `pad_token_id` are set.

    Raises:
        LongcptError: the folder is missing, cannot be loaded, or has neither BOS nor EOS.
    """
    path = Path(path)
    if not path.is_dir():
        raise LongcptError(f"tokenizer folder {str(path)!r} not found (train one with "
                           "data_prep/train_tokenizer.py or point to a Hugging Face model folder)")
    from transformers import AutoTokenizer

    try:
        # Never run (or ask to run) a folder's own code: an exported Infini folder's config.json
        # has an auto_map, and a tokenizer needs none of it.
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise LongcptError(f"tokenizer folder {str(path)!r} cannot be loaded: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise LongcptError(f"tokenizer folder {str(path)!r} has no fast tokenizer (tokenizer.json)")
    if tok.eos_token is None and tok.bos_token is None:
        raise LongcptError(f"tokenizer {str(path)!r} defines neither bos_token nor eos_token; "
                           "set them in its tokenizer_config.json")
    if tok.eos_token is None:
        warnings.warn(f"tokenizer {path}: no eos_token, using bos_token {tok.bos_token!r}", stacklevel=2)
        tok.eos_token = tok.bos_token
    if tok.bos_token is None:
        warnings.warn(f"tokenizer {path}: no bos_token, using eos_token {tok.eos_token!r}", stacklevel=2)
        tok.bos_token = tok.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # pads carry label -100, so their id never matters for the loss
    return tok


# Files a Hugging Face tokenizer folder may hold (copied into run folders and exports).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[Path]:
    """Copy the tokenizer files of folder `src` into folder `dst`; returns the copies (may be none)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            copied.append(Path(shutil.copy2(Path(src) / name, Path(dst) / name)))
    return copied


def special_ids(tokenizer) -> dict[str, int]:
    """`{"bos_id", "eos_id", "pad_id"}` of a tokenizer from `load_tokenizer`."""
    return {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
