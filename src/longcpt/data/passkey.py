"""Passkey retrieval prompts (Landmark Attention format), exact in tokens of the real tokenizer.

The format follows Mohtashami & Jaggi, "Landmark Attention" (arXiv 2305.16300;
epfml/landmark-attention `llama/run_test.py`), pieces joined by newlines:

    [BOS] There is an important info hidden inside a lot of irrelevant text. Find it and
    memorize them. I will quiz you about the important information there.
     The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...
    The pass key is 12345. Remember it. 12345 is the pass key.
     ... The grass is green. The sky is blue.
    What is the pass key? The pass key is                      <- prompt ends here
     12345                                                     <- answer (fine-tuning target)

Landmark counts filler in characters. Here every piece is tokenized once and the prompt is
assembled from token ids, so a prompt of `length` has exactly `length` tokens of the tokenizer the
model uses; the filler is cut to the token. The needle goes at filler offset `depth * filler_len`,
moved back to the nearest sentence start (as the needle-in-a-haystack harness does,
gkamradt/LLMTest_NeedleInAHaystack), so depth 0 puts it right after the instruction and depth 1
right before the question. Keys are random 5-digit numbers drawn per (length, depth, trial) from a
seed, so adding a length to a sweep does not change the keys of the others.

Digits of the key. By default the key is tokenized as text (" 12345" is whatever the tokenizer
makes of it). With `split_digits=True` it is written one digit per token (" 1", "2", "3", ...),
in the needle and in the answer alike, as Llama's tokenizer does for every number. That matters
for byte-level BPE tokenizers trained on little text (the demo's): they cut 5-digit numbers into
2-4 irregular pieces drawn from hundreds of rare number tokens, so a small model must learn to copy
each of those rare tokens; one token per digit leaves it 20 well-trained tokens to copy.
Fine-tuning data and evaluation must use the same setting (`make_passkey.py --split-digits`,
`longcpt eval passkey --split-digits`).

The tokenizer is a transformers tokenizer (`encode(text, add_special_tokens=False)`,
`bos_token_id`, `eos_token_id`, `decode`), as `AutoTokenizer.from_pretrained(model_dir)` returns.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from longcpt.data.datamodule import register_datamodule
from longcpt.data.task import TaskDataModule
from longcpt.errors import LongcptError
from longcpt.fsio import atomic_write_text

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5


@dataclass
class PasskeyExample:
    """One prompt and its answer, as token ids.

    Attributes:
        input_ids: the prompt, exactly `length` tokens (BOS first when the tokenizer has one).
        answer_ids: the answer tokens (" 12345"), what fine-tuning puts the loss on.
        key: the pass key.
        length: requested prompt length in tokens.
        depth: requested needle depth in [0, 1].
        needle_start: index of the needle's first token in `input_ids`.
        needle_depth: the depth actually used (needle offset / filler tokens), within one
            sentence of `depth`.
    """

    input_ids: list[int]
    answer_ids: list[int]
    key: int
    length: int
    depth: float
    needle_start: int
    needle_depth: float


class PasskeyPromptBuilder:
    """Builds passkey prompts of exact token lengths for one tokenizer.

    Args:
        tokenizer: a transformers tokenizer.
        split_digits: write the key one digit per token (module docstring).
        filler_offset: the filler sentence the cycle starts with (0 = "The grass is green.");
            another offset lays out other filler tokens around the needle, e.g. to evaluate on
            prompts whose filler was never seen in training.

    Attributes:
        min_length: a length that fits every key tried (no filler): the instruction, the longest of
            a sample of needles and the question. A key's own minimum is `fixed_tokens(key)`.
    """

    def __init__(self, tokenizer, split_digits: bool = False, filler_offset: int = 0):
        self.tokenizer = tokenizer
        self.split_digits = split_digits
        self.filler_offset = filler_offset
        encode = self._encode
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.head = encode(TASK + "\n")
        # One unit per filler sentence, each with its leading space (the filler is space-joined).
        self.units = [encode(" " + s) for s in FILLER_SENTENCES]
        self.tail = encode("\n" + QUESTION)
        if split_digits:
            # Only the key's digits vary between needles: the pieces are encoded once (a byte-level
            # pre-tokenizer cuts before every " word" and ".", so the text around the key is
            # tokenized as in the whole sentence).
            before, middle, after = NEEDLE.split("{key}")
            self._needle_parts = (encode("\n" + before.rstrip(" ")), encode(middle.rstrip(" ")), encode(after + "\n"))
            self._digits = {d: encode(d) for d in "0123456789"}
            self._first_digits = {d: encode(" " + d) for d in "0123456789"}
            probe = 10 ** KEY_DIGITS - 1 - 12345
            if tokenizer.decode(self._key_ids(probe)) != f" {probe}":
                raise LongcptError(
                    f"split_digits: this tokenizer does not decode digit tokens back to the number "
                    f"({tokenizer.decode(self._key_ids(probe))!r} for {probe}); evaluate without --split-digits"
                )
        sample = [10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS - 1] + [passkey_key(0, 0, 0, i) for i in range(32)]
        self.min_length = max(self.fixed_tokens(k) for k in sample)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _key_ids(self, key: int) -> list[int]:
        """Tokens of " {key}": as the tokenizer cuts it, or one per digit with `split_digits`."""
        if not self.split_digits:
            return self._encode(f" {key}")
        digits = str(key)
        return self._first_digits[digits[0]] + [t for d in digits[1:] for t in self._digits[d]]

    def _needle(self, key: int) -> list[int]:
        if not self.split_digits:
            return self._encode("\n" + NEEDLE.format(key=key) + "\n")
        before, middle, after = self._needle_parts
        key_ids = self._key_ids(key)
        return before + key_ids + middle + key_ids + after

    def key_positions(self, example: PasskeyExample) -> list[int]:
        """Indices in `example.input_ids` of the needle's tokens that carry a digit of the key (both
        mentions; the needle's text has no other digits)."""
        needle = self._needle(example.key)
        return [example.needle_start + i for i, t in enumerate(needle)
                if any(ch.isdigit() for ch in self.tokenizer.decode([t]))]

    def needle_length(self, key: int) -> int:
        """Tokens of the needle sentence for `key` (it starts at `PasskeyExample.needle_start`)."""
        return len(self._needle(key))

    def fixed_tokens(self, key: int) -> int:
        """Prompt tokens besides the filler for `key`: the shortest prompt possible with it."""
        return len(self.bos) + len(self.head) + len(self._needle(key)) + len(self.tail)

    def answer_ids(self, key: int) -> list[int]:
        """Tokens of the answer that follows the prompt (" 12345")."""
        return self._key_ids(key)

    def filler(self, n: int) -> tuple[list[int], list[int]]:
        """`n` filler tokens and the offsets where a sentence starts (0 and `n` included).

        Returns:
            (tokens, boundaries): the sentence cycle repeated and cut to exactly `n` tokens.
        """
        tokens: list[int] = []
        boundaries = [0]
        i = 0
        while len(tokens) < n:
            tokens += self.units[(i + self.filler_offset) % len(self.units)]
            boundaries.append(len(tokens))
            i += 1
        boundaries = [b for b in boundaries if b < n] + [n]
        return tokens[:n], boundaries

    def build(self, length: int, depth: float, key: int) -> PasskeyExample:
        """A prompt of exactly `length` tokens with the needle for `key` at `depth`.

        Raises:
            LongcptError: `length` below `min_length`, or `depth` outside [0, 1].
        """
        if not 0.0 <= depth <= 1.0:
            raise LongcptError(f"passkey depth {depth}: must be in [0, 1] (0 = start, 1 = end of the filler)")
        needle = self._needle(key)
        n_filler = length - self.fixed_tokens(key)
        if n_filler < 0:
            raise LongcptError(
                f"passkey length {length}: too short for this tokenizer; instruction, needle and question alone "
                f"take {length - n_filler} tokens (use lengths >= {max(self.min_length, length - n_filler)})"
            )
        filler, boundaries = self.filler(n_filler)
        # Back off to the last sentence start at or before the requested offset.
        cut = max(b for b in boundaries if b <= depth * n_filler + 1e-9)
        prefix = self.bos + self.head + filler[:cut]
        input_ids = prefix + needle + filler[cut:] + self.tail
        return PasskeyExample(
            input_ids=input_ids,
            answer_ids=self.answer_ids(key),
            key=key,
            length=length,
            depth=depth,
            needle_start=len(prefix),
            needle_depth=cut / n_filler if n_filler else depth,
        )


def passkey_key(seed: int, length: int, depth: float | str, trial: int) -> int:
    """The 5-digit key of one trial: a pure function of (seed, length, depth, trial)."""
    rng = random.Random(f"passkey:{seed}:{length}:{depth}:{trial}")  # str seeds are stable across runs
    return rng.randint(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS - 1)


def make_passkey_examples(
    tokenizer,
    lengths: Iterable[int],
    depths: Iterable[float | str],
    n: int,
    seed: int = 0,
    split_digits: bool = False,
) -> Iterator[dict]:
    """The sweep lengths x depths x `n` trials as JSON-ready rows (what `make_passkey.py` writes).

    Args:
        tokenizer: a transformers tokenizer.
        lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1], or "random" for a depth drawn uniformly per example
            (for fine-tuning data).
        n: examples per (length, depth).
        seed: fixes keys and random depths.
        split_digits: write the key one digit per token (module docstring).

    Yields:
        {"id", "length", "depth", "needle_depth", "key", "input_ids", "answer_ids", "prompt",
        "answer"}.

    Raises:
        LongcptError: a length too short or a depth outside [0, 1].
    """
    builder = PasskeyPromptBuilder(tokenizer, split_digits=split_digits)
    for length in lengths:
        for depth in depths:
            for trial in range(n):
                key = passkey_key(seed, length, depth, trial)
                if depth == "random":
                    value = random.Random(f"depth:{seed}:{length}:{trial}").random()
                else:
                    value = float(depth)
                ex = builder.build(length, value, key)
                yield {
                    "id": f"L{length}-d{depth}-t{trial}",
                    "length": length,
                    "depth": value,
                    "needle_depth": ex.needle_depth,
                    "key": key,
                    "input_ids": ex.input_ids,
                    "answer_ids": ex.answer_ids,
                    "prompt": tokenizer.decode(ex.input_ids),
                    "answer": tokenizer.decode(ex.answer_ids),
                }


def log_spaced_lengths(lo: int, hi: int, n: int) -> tuple[int, ...]:
    """`n` prompt lengths from `lo` to `hi` tokens, evenly spaced in log length (rounded, repeats
    dropped): fine-tuning data spread over a window, as many short lengths as long ones.

    Example: log_spaced_lengths(96, 512, 4) == (96, 168, 293, 512).
    """
    if not 0 < lo <= hi or n < 2:
        raise LongcptError(f"log-spaced lengths {lo}:{hi}:{n}: need 0 < LO <= HI and N >= 2")
    ratio = math.log(hi / lo)
    return tuple(sorted({round(lo * math.exp(ratio * i / (n - 1))) for i in range(n)}))


def write_passkey_jsonl(
    path: str | Path,
    tokenizer,
    lengths: Iterable[int],
    depths: Iterable[float | str],
    n: int,
    seed: int = 0,
    split_digits: bool = False,
) -> int:
    """Write `make_passkey_examples(...)` to a JSONL file, atomically; returns the number of rows.

    What `data_prep/make_passkey.py` does (arguments as `make_passkey_examples`); the file appears
    only when complete.

    Raises:
        LongcptError: as `make_passkey_examples`.
    """
    lines = [json.dumps(row) for row in make_passkey_examples(tokenizer, lengths, depths, n, seed, split_digits)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return len(lines)


def read_passkey_pairs(path: str, seq_len: int, eos_id: int | None) -> list[tuple[list[int], list[int]]]:
    """Fine-tuning pairs (prompt ids, answer ids + EOS) from a `make_passkey.py` JSONL file.

    Raises:
        LongcptError: missing file, a line that is not a passkey row (named by `file:line`), or an
            example longer than `seq_len`.
    """
    file = Path(path)
    if not file.is_file():
        raise LongcptError(f"passkey data {file}: not found (make it with data_prep/make_passkey.py)")
    pairs = []
    with file.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, answer = list(row["input_ids"]), list(row["answer_ids"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LongcptError(
                    f"{file}:{line_no}: not a passkey row ({type(e).__name__}: {e}); "
                    "expected JSON with input_ids and answer_ids as written by data_prep/make_passkey.py"
                ) from None
            target = answer + ([eos_id] if eos_id is not None else [])
            if len(prompt) + len(target) > seq_len:
                raise LongcptError(
                    f"{file}:{line_no}: example of {len(prompt) + len(target)} tokens (prompt + answer + EOS) "
                    f"does not fit data.seq_len={seq_len}; raise data.seq_len or make the data with shorter --lengths"
                )
            pairs.append((prompt, target))
    if not pairs:
        raise LongcptError(f"passkey data {file}: no examples")
    return pairs


@register_datamodule("passkey")
def build_passkey_datamodule(cfg, tokenizer):
    """The fine-tuning DataModule for `data.task: passkey` (loss on the answer and EOS only)."""
    return TaskDataModule(cfg, tokenizer, functools.partial(read_passkey_pairs, eos_id=tokenizer.eos_token_id))
