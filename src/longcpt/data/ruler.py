"""RULER-style synthetic long-context tasks, generated locally and exact in tokens.

The tasks follow NVIDIA's RULER (Hsieh et al. 2024, arXiv 2404.06654; NVIDIA/RULER
`scripts/synthetic.yaml`), restricted to those that need no download:

    task              asks for                                         references
    niah_single       the value of one key among haystack text          1 value
    niah_multikey     the value of one key; 3 distractor keys inserted   1 value
    niah_multivalue   the 4 values written for one key                   4 values
    niah_multiquery   the values of 4 keys                               4 values
    vt                every variable bound to a number through a chain   5 variable names
                      "VAR QXJBT = 54321" -> "VAR LKPOW = VAR QXJBT" ...
    cwe               the 10 most common words of a numbered word list   10 words
    fwe               the 3 most frequent coded words (Zipf, alpha 2)    3 coded words

Needles read "One of the special magic numbers for {key} is: {value}." with keys made of an
adjective and a noun ("brave-harbor") and 7-digit values; the prompt and answer wording follows
RULER's templates, and the prompt ends with the start of the answer (" The special magic number
for brave-harbor mentioned in the provided text is"), so a base model only has to continue it.

Haystacks (niah and vt): by default RULER's "noise", the five sentences "The grass is green. The
sky is blue. ..." repeated; or real text (`load_haystack`: any prepared corpus or text files,
split at sentence ends). cwe and fwe are their own haystack: the word list is the context.

Exact lengths. Every piece (instruction, haystack sentence, needle, question) is tokenized once
with the model's tokenizer and prompts are assembled from token ids, so the length of a prompt is
a sum of piece lengths. The haystack size is the largest one that fits the requested length,
found by bisection over its prefix sums (RULER searches the haystack size the same way, by
re-tokenizing whole prompts). niah and vt then cut the next haystack sentence to the token, so
their prompts have exactly the requested length. cwe adds whole list entries only (a cut entry
would change the counts), so it is at most one entry short; fwe fills what one more Zipf draw
would overshoot with the ignored noise word "...". Both stay within 2% at the lengths
`min_length` allows.

Randomness: sample `index` of (task, length) draws everything from its own generator seeded with
`(seed, task, length, index)`, so a sample never depends on which other samples, lengths or tasks
are generated (an interrupted evaluation resumes with the same prompts).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from longcpt.errors import LongcptError

# ---------------------------------------------------------------------------------------------
# Fixed text

NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")
NEEDLE = "One of the special magic {kind} for {key} is: {value}."

# Word lists written for longcpt (no download): niah keys are "adjective-noun" pairs (8,000+ of
# them, as RULER draws its keys from wonderwords' lists), cwe draws from all three lists, then
# from generated pronounceable words when a long list needs more distinct words.
ADJECTIVES = """
able acid angry aware bald basic bitter black blind bold brave brief bright broad brown busy calm
cheap chief clean clear close cold cool crazy cruel curly damp dark deep dense dirty dry dull eager
early easy empty equal even evil exact faint fair false fancy fast fat fierce final fine firm flat
fond free fresh full funny gentle giant glad golden good grand great green grey happy hard harsh
heavy high hollow honest huge humble hungry idle jolly keen kind large late lazy light little lively
local lone long loose loud lovely low loyal lucky mad magic major merry mild minor modern moist
narrow neat new nice noble odd old open pale plain polite poor proud pure quick quiet rapid rare raw
ready real rich rigid ripe rough round royal rude rural sad safe salty sharp shiny short shy silent
silly simple slim slow small smart smooth soft solid sour spare stable steep stiff still strange
strict strong sweet swift tall tame tender thick thin tidy tiny tough true ugly urban vague vast
vivid warm weak wet white whole wide wild wise witty young
""".split()
NOUNS = """
actor album anchor angle apple arrow autumn badge bakery banana basket beach bean bell bicycle bird
blanket boat bottle branch bread bridge brush bucket cabin cable camera candle canyon carpet castle
cellar chair channel cherry chimney circle citizen cliff clock cloud coast coffee collar comet
cookie copper corner cottage cousin crayon desert diamond dinner dolphin dragon drawer eagle engine
falcon feather fence field finger flag flower forest fossil fountain garden garlic ginger glacier
glove guitar hammer harbor helmet hill honey horizon island jacket jungle kettle kitten ladder lake
lantern lemon letter library lizard magnet mango maple market meadow mirror monkey mountain needle
novel ocean office orange orchard oven paddle palace panda paper parrot pebble pencil pepper piano
pillow pirate planet pocket pond potato puzzle quartz rabbit radio raven ribbon river rocket saddle
salmon sandal school shadow shell shovel signal silver singer sparrow spider spoon statue stone
street summer sunset table teacher temple thunder ticket tiger tomato tower tractor train tunnel
turtle valley velvet village violin wagon walnut whale window winter wizard yacht zebra
""".split()
VERBS = """
accept admire answer arrive bake balance borrow bounce breathe build carry change chase clean climb
collect count cover crawl dance decide deliver design dream drift earn enjoy enter explain explore
fetch finish float fold follow gather greet guard guess hammer handle hover hunt imagine invent
juggle jump knit laugh launch listen measure melt mention mix notice offer open paint pause plant
polish pour pretend protect pull push question reach record relax remember repair repeat rescue
return rinse roar rush sail search settle share shiver shout signal skate sketch slide smile sneeze
sort spell spill spin squeeze stitch stretch succeed supply surprise swim taste thank travel trust
twist unlock vanish visit wander wash whisper wiggle wonder wrap yawn
""".split()

# Prompt templates (RULER `scripts/data/synthetic/constants.py`): the prompt is template + answer
# prefix; the model continues with the answer.
NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {kind} afterwards.\n")
NIAH_QUESTION = "\nWhat are all the special magic {kind} for {query} mentioned in the provided text?"
NIAH_ANSWER = " The special magic {kind} for {query} mentioned in the provided text are"
VT_TEMPLATE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
             "assigned the value {value}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n")
CWE_QUESTION = "\nQuestion: What are the {n} most common words in the above list?"
CWE_ANSWER = " Answer: The top {n} words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words.")
FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text?")
FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"


# ---------------------------------------------------------------------------------------------
# Task table


@dataclass(frozen=True)
class TaskSpec:
    """One task: its generator and its answer budget.

    Attributes:
        name: the task's name on the command line.
        max_new_tokens: tokens generated for the answer (RULER's `tokens_to_generate`; at least
            twice a correct answer's tokens, see `RulerSample`).
        uses_haystack: niah and vt fill with the haystack; cwe and fwe are their own context.
        options: the generator's settings (needle counts, hops, frequencies).
    """

    name: str
    max_new_tokens: int
    uses_haystack: bool
    options: dict = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {
    "niah_single": TaskSpec("niah_single", 128, True, {"keys": 1, "values": 1, "queries": 1}),
    "niah_multikey": TaskSpec("niah_multikey", 128, True, {"keys": 4, "values": 1, "queries": 1}),
    "niah_multivalue": TaskSpec("niah_multivalue", 128, True, {"keys": 1, "values": 4, "queries": 1}),
    "niah_multiquery": TaskSpec("niah_multiquery", 128, True, {"keys": 4, "values": 1, "queries": 4}),
    "vt": TaskSpec("vt", 30, True, {"chains": 1, "hops": 4}),
    "cwe": TaskSpec("cwe", 120, False, {"words": 10}),
    "fwe": TaskSpec("fwe", 50, False, {"alpha": 2.0, "answers": 3}),
}
MAX_SHORTFALL = 0.02  # a prompt may be this much shorter than asked (cwe and fwe add whole entries)
NIAH_TASKS = tuple(t for t in TASKS if t.startswith("niah"))


def check_tasks(tasks: Sequence[str]) -> None:
    """Raise one LongcptError naming every unknown task and the known ones."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise LongcptError(f"--tasks {','.join(unknown)}: unknown task{'s' if len(unknown) > 1 else ''}; "
                           f"known tasks: {','.join(TASKS)}")
    if not tasks:
        raise LongcptError(f"--tasks: empty (e.g. --tasks {','.join(NIAH_TASKS)},vt)")


@dataclass
class RulerSample:
    """One prompt and what a correct answer contains.

    Attributes:
        task: task name.
        length: requested prompt length in tokens.
        index: sample number within (task, length).
        input_ids: the prompt (BOS first when the tokenizer has one), at most `length` tokens.
        references: strings a correct answer contains (scored case-insensitively).
        max_new_tokens: the answer budget: RULER's for the task (`TaskSpec.max_new_tokens`), or
            twice the tokens of a correct answer when that is more.
        inserts: (start, end) token spans of the inserted needles / chain statements, in prompt
            order (niah and vt).
    """

    task: str
    length: int
    index: int
    input_ids: list[int]
    references: list[str]
    max_new_tokens: int
    inserts: list[tuple[int, int]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Haystacks


@dataclass(frozen=True)
class Haystack:
    """Filler units (token lists, each with its leading separator), cycled as long as needed.

    Attributes:
        units: the units in text order.
        name: "noise" or the source it was read from (recorded in outputs).
    """

    units: tuple[tuple[int, ...], ...]
    name: str


def noise_haystack(encode: Callable[[str], list[int]]) -> Haystack:
    """RULER's noise: the five sentences as paragraphs, one unit per sentence (a line per paragraph)."""
    last = len(NOISE_SENTENCES) - 1
    units = tuple(tuple(encode(" " + s + ("\n" if i == last else ""))) for i, s in enumerate(NOISE_SENTENCES))
    return Haystack(units, "noise")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MAX_UNIT_WORDS = 24  # long "sentences" (code, lists) are cut into pieces, so needles land anywhere


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` with whitespace collapsed; long ones cut every `MAX_UNIT_WORDS` words."""
    pieces = []
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        words = sentence.split(" ")
        pieces += [" ".join(words[i : i + MAX_UNIT_WORDS]) for i in range(0, len(words), MAX_UNIT_WORDS)]
    return [p for p in pieces if p]


def load_haystack(path: str | Path, tokenizer, max_tokens: int = 1 << 20) -> Haystack:
    """Real text for niah/vt haystacks: a prepared corpus folder or text files, read in order.

    Args:
        path: a folder written by `data_prep/prepare_corpus.py` (its `input_ids` are decoded with
            `tokenizer`, so prepare it with the model's tokenizer; a `text` column is used as is),
            or `.jsonl` / `.json` / `.parquet` (field `text`) / `.txt` files, folders or globs.
        tokenizer: the model's tokenizer.
        max_tokens: stop reading once the units hold this many tokens (prompts cycle through them).

    Raises:
        LongcptError: nothing readable, or no text in it.
    """
    texts = _haystack_texts(Path(path), tokenizer)
    units, total = [], 0
    for text in texts:
        sentences = split_sentences(text)
        if not sentences:
            continue
        for ids in tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]:
            if ids:
                units.append(tuple(ids))
                total += len(ids)
        if total >= max_tokens:
            break
    if not units:
        raise LongcptError(f"--haystack {path}: no text found (pass a prepared corpus or text files with text)")
    return Haystack(tuple(units), str(path))


def _haystack_texts(path: Path, tokenizer):
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        from datasets import load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise LongcptError(f"--haystack {path}: not a prepared corpus ({e}); use data_prep/prepare_corpus.py") from None
        if "text" in dataset.column_names:
            yield from (row["text"] for row in dataset)
        elif "input_ids" in dataset.column_names:
            vocab = len(tokenizer)
            for row in dataset:
                ids = row["input_ids"]
                if ids and max(ids) >= vocab:
                    raise LongcptError(f"--haystack {path}: token id {max(ids)} is outside the model's vocabulary "
                                       f"({vocab}); prepare the corpus with the model's tokenizer or pass text files")
                yield tokenizer.decode(ids)
        else:
            raise LongcptError(f"--haystack {path}: no text or input_ids column (columns: {dataset.column_names})")
        return
    from longcpt.data.records import expand_inputs, iter_records

    for text, _, _ in iter_records(expand_inputs([str(path)]), "text", on_reject=lambda _: None):
        yield text


# ---------------------------------------------------------------------------------------------
# Exact-length assembly (pure functions of token lists)


def fit_units(budget: int, lengths: Sequence[int]) -> int:
    """The largest n with sum(lengths[:n]) <= budget (lengths positive), by bisection on prefix sums."""
    prefix = list(itertools.accumulate(lengths))
    return bisect.bisect_right(prefix, budget)


def _cycled(units: Sequence[Sequence[int]], start: int, min_tokens: int) -> list[Sequence[int]]:
    """Units from `start` on, cycling, until they hold more than `min_tokens` tokens."""
    out, total, i = [], 0, start
    while total <= min_tokens:
        unit = units[i % len(units)]
        out.append(unit)
        total += len(unit)
        i += 1
    return out


def assemble(
    length: int,
    head: list[int],
    tail: list[int],
    haystack: Haystack,
    inserts: Sequence[tuple[float, list[int]]],
    start: int = 0,
) -> tuple[list[int], list[tuple[int, int]]]:
    """A prompt of exactly `length` tokens: head, haystack with inserts at their depths, tail.

    The haystack runs from unit `start` (cycling). Whole units are taken while they fit, then the
    next one is cut to the token. Insert i goes before haystack unit floor(depth_i * (n + 1))
    (n = whole units taken); inserts at the same gap keep their order.

    Args:
        length: prompt length in tokens.
        head: tokens before the haystack (BOS and instruction).
        tail: tokens after it (question and answer prefix).
        haystack: the filler.
        inserts: (depth in [0, 1], tokens) of each needle.
        start: first haystack unit.

    Returns:
        (input_ids, spans): the prompt and the (start, end) span of each insert in prompt order.

    Raises:
        LongcptError: the fixed pieces alone are longer than `length`.
    """
    fixed = len(head) + len(tail) + sum(len(ids) for _, ids in inserts)
    budget = length - fixed
    if budget < 0:
        raise LongcptError(f"instruction, needles and question take {fixed} tokens")
    units = _cycled(haystack.units, start, budget)
    n = fit_units(budget, [len(u) for u in units])
    rest = budget - sum(len(u) for u in units[:n])
    gaps = sorted(((min(n, math.floor(d * (n + 1))), i) for i, (d, _) in enumerate(inserts)))
    ids, spans, g = list(head), [], 0
    for gap, i in gaps:
        for unit in units[g:gap]:
            ids += unit
        g = gap
        spans.append((len(ids), len(ids) + len(inserts[i][1])))
        ids += inserts[i][1]
    for unit in units[g:n]:
        ids += unit
    ids += units[n][:rest]
    ids += tail
    return ids, spans


# ---------------------------------------------------------------------------------------------
# Random values


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_value(rng: random.Random, kind: str) -> str:
    """A needle value: "numbers" (7 digits), "words" (adjective-noun) or "uuids"."""
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        return random_key(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def distinct(rng: random.Random, draw: Callable[[random.Random], str], n: int, avoid: set[str] = frozenset()) -> list[str]:
    """`n` distinct draws, none in `avoid`."""
    out: list[str] = []
    while len(out) < n:
        value = draw(rng)
        if value not in out and value not in avoid:
            out.append(value)
    return out


_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@functools.lru_cache(maxsize=8)
def word_pool(n: int) -> tuple[str, ...]:
    """`n` distinct words: the built-in English words first, then generated ones ("bamoli", ...)."""
    pool = list(dict.fromkeys(NOUNS + ADJECTIVES + VERBS))
    if n > len(pool):
        known = set(pool)
        for a, b, c in itertools.product(_SYLLABLES, repeat=3):
            word = a + b + c
            if word not in known:
                pool.append(word)
                if len(pool) >= n:
                    break
    if n > len(pool):
        raise LongcptError(f"cwe: {n} distinct words needed, only {len(pool)} can be made; use shorter --lengths")
    return tuple(pool[:n])


def zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (partial sum plus the Euler-Maclaurin tail)."""
    head = sum(k**-alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + terms**-alpha / 2


# ---------------------------------------------------------------------------------------------
# The generator


class RulerGenerator:
    """Builds RULER samples of exact token lengths for one tokenizer and haystack.

    Args:
        tokenizer: a transformers tokenizer (`encode(text, add_special_tokens=False)`,
            `bos_token_id`), as `AutoTokenizer.from_pretrained(model_dir)` returns.
        haystack: filler for niah and vt (default: the noise sentences).
    """

    def __init__(self, tokenizer, haystack: Haystack | None = None):
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self._cache: dict[str, list[int]] = {}
        self.haystack = haystack or noise_haystack(self.encode)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens), cached: prompts repeat the same pieces."""
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = list(self.tokenizer.encode(text, add_special_tokens=False))
        return ids

    def sample(self, task: str, length: int, index: int, seed: int = 0) -> RulerSample:
        """Sample `index` of `task` at `length` tokens (a pure function of its arguments).

        Raises:
            LongcptError: unknown task, or `length` too short for it (the message gives the minimum).
        """
        check_tasks([task])
        rng = random.Random(f"ruler:{seed}:{task}:{length}:{index}")  # str seeds are stable across runs
        spec = TASKS[task]
        build = {"vt": self._vt, "cwe": self._cwe, "fwe": self._fwe}.get(task, self._niah)
        try:
            ids, references, spans = build(length, rng, **spec.options)
        except LongcptError as e:
            raise LongcptError(f"--lengths {length}: too short for {task} ({e}); use lengths >= "
                               f"{self.min_length(task)}") from None
        if len(ids) < (1 - MAX_SHORTFALL) * length:  # cwe/fwe at a length of a few list entries
            raise LongcptError(f"--lengths {length}: too short for {task} to come within "
                               f"{MAX_SHORTFALL:.0%} of it (got {len(ids)} tokens); use lengths >= {self.min_length(task)}")
        # RULER's budgets are counted in Llama tokens; a tokenizer that cuts the answer finer gets
        # twice the length of a correct answer.
        budget = max(spec.max_new_tokens, 2 * len(self.encode(answer_text(task, references))))
        return RulerSample(task, length, index, ids, references, budget, spans)

    def min_length(self, task: str, probes: int = 8) -> int:
        """A length that fits every sample of `task` tried (no haystack, or the shortest word list)."""
        best = 0
        for index in range(probes):
            rng = random.Random(f"ruler:min:{task}:{index}")
            best = max(best, self._min_length(task, rng))
        return best

    def _min_length(self, task: str, rng: random.Random) -> int:
        spec = TASKS[task]
        if task == "cwe":
            return self._cwe(0, rng, measure_only=True, **spec.options)
        if task == "fwe":
            return self._fwe(0, rng, measure_only=True, **spec.options)
        build = self._vt if task == "vt" else self._niah
        head, tail, inserts, _ = build(0, rng, parts_only=True, **spec.options)
        return len(head) + len(tail) + sum(len(ids) for _, ids in inserts) + 2 * max(map(len, self.haystack.units))

    def _start(self, rng: random.Random) -> int:
        """First haystack unit: the noise starts at its first sentence, real text anywhere."""
        start = rng.randrange(len(self.haystack.units))
        return 0 if self.haystack.name == "noise" else start

    # -- niah --------------------------------------------------------------------------------

    def _niah(self, length, rng, keys, values, queries, kind="numbers", parts_only=False):
        key_list = distinct(rng, random_key, keys)
        value_list = distinct(rng, lambda r: random_value(r, kind), keys * values)
        needles = [(k, value_list[i * values + j]) for i, k in enumerate(key_list) for j in range(values)]
        rng.shuffle(needles)
        asked = rng.sample(key_list, queries)
        answers = [v for k in asked for kk, v in needles if kk == k]
        query = asked[0] if queries == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
        head = self.bos + self.encode(_niah_text(NIAH_TEMPLATE, kind, len(answers), query))
        tail = self.encode(_niah_text(NIAH_QUESTION + NIAH_ANSWER, kind, len(answers), query))
        inserts = [(rng.random(), self.encode(" " + NEEDLE.format(kind=kind, key=k, value=v))) for k, v in needles]
        if parts_only:
            return head, tail, inserts, answers
        ids, spans = assemble(length, head, tail, self.haystack, inserts, self._start(rng))
        return ids, answers, spans

    # -- vt ----------------------------------------------------------------------------------

    def _vt(self, length, rng, chains, hops, parts_only=False):
        names = distinct(rng, lambda r: "".join(r.choices(string.ascii_uppercase, k=5)), chains * (hops + 1))
        values = distinct(rng, lambda r: str(r.randint(10000, 99999)), chains)
        statements = []
        for c in range(chains):
            chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
            lines = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
            # Depths sorted within a chain: every assignment comes after the one it copies.
            depths = sorted(rng.random() for _ in lines)
            statements += [(d, self.encode(" " + line)) for d, line in zip(depths, lines)]
        head = self.bos + self.encode(VT_TEMPLATE)
        tail = self.encode(VT_QUESTION.format(value=values[0]) + VT_ANSWER.format(n=hops + 1, value=values[0]))
        answers = names[: hops + 1]
        if parts_only:
            return head, tail, statements, answers
        ids, spans = assemble(length, head, tail, self.haystack, statements, self._start(rng))
        return ids, answers, spans

    # -- cwe ---------------------------------------------------------------------------------

    def _cwe(self, length, rng, words, measure_only=False):
        # RULER: 30 copies of each common word and 3 of the others from 4K on, 6 and 1 below.
        common_copies, other_copies = (30, 3) if length >= 4096 else (6, 1)
        head = self.bos + self.encode(CWE_TEMPLATE)
        tail = self.encode(CWE_QUESTION.format(n=words) + CWE_ANSWER.format(n=words))
        n_common = words * common_copies
        most = words + max(8, length // 2)  # every entry has >= 2 tokens (number, word)
        pool = word_pool(most)
        order = rng.sample(range(len(pool)), len(pool))
        chosen = [pool[i] for i in order]
        common, others = chosen[:words], chosen[words:]
        # Entry e of the list before shuffling: the common block, then each other word `other_copies` times.
        def entry(e: int) -> str:
            return common[e // common_copies] if e < n_common else others[(e - n_common) // other_copies]

        def entry_len(e: int) -> int:
            return len(self.encode(f" {e + 1}.")) + len(self.encode(" " + entry(e)))

        fixed = len(head) + len(tail)
        # Shortest list: the common block and two other words. `min_length` bounds it with the longest
        # entry any word can make (numbers below 10^4, every built-in word and some generated ones),
        # and asks for 1 / MAX_SHORTFALL of that entry, since the list grows by whole entries.
        needed = n_common + other_copies * 2
        if measure_only:
            words_max = max(len(self.encode(" " + w)) for w in word_pool(len(NOUNS + ADJECTIVES + VERBS) + 256))
            longest = len(self.encode(" 9999.")) + words_max
            return max(fixed + needed * longest, math.ceil(longest / MAX_SHORTFALL))
        minimum = fixed + sum(entry_len(e) for e in range(needed))
        if length < minimum:
            raise LongcptError(f"the word list needs at least {minimum} tokens")
        lengths = []
        total = fixed
        limit = n_common + other_copies * len(others)
        while len(lengths) < limit and total <= length:
            lengths.append(entry_len(len(lengths)))
            total += lengths[-1]
        n = fit_units(length - fixed, lengths)
        entries = [entry(e) for e in range(n)]
        rng.shuffle(entries)
        ids = list(head)
        for i, word in enumerate(entries):
            ids += self.encode(f" {i + 1}.") + self.encode(" " + word)
        return ids + tail, list(common), []

    # -- fwe ---------------------------------------------------------------------------------

    def _fwe(self, length, rng, alpha, answers, measure_only=False):
        vocab_size = max(answers + 2, length // 50)  # RULER: one coded word per 50 tokens of context
        vocab = distinct(rng, lambda r: "".join(r.choices(string.ascii_lowercase, k=6)), vocab_size)
        vocab[0] = "..."  # the most frequent "word" is noise, as in RULER
        z = zeta(alpha)
        weights = [k**-alpha / z for k in range(1, vocab_size + 1)]

        def counts(n: int) -> list[int]:
            return [int(n * w) for w in weights]

        def size(n: int) -> int:
            return sum(c * len(self.encode(" " + w)) for c, w in zip(counts(n), vocab))

        head = self.bos + self.encode(FWE_TEMPLATE)
        tail = self.encode(FWE_QUESTION + FWE_ANSWER)
        # The answer is well defined once the last answer occurs and more often than the next word.
        least = 1
        while not _answers_stand_out(counts(least), answers):
            least += 1
        noise = len(self.encode(" " + vocab[0]))
        minimum = max(len(head) + len(tail) + size(least), math.ceil(noise / MAX_SHORTFALL))
        if measure_only:
            return minimum
        if length < minimum:
            raise LongcptError(f"the coded text needs at least {minimum} tokens")
        budget = length - len(head) - len(tail)
        lo, hi = least, least
        while size(hi) <= budget:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # size(lo) <= budget < size(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid)
        words = [w for c, w in zip(counts(lo), vocab) for _ in range(c)]
        # One more draw can add several coded words at once; the rest is filled with the noise word,
        # which only makes the ignored "..." more frequent.
        words += [vocab[0]] * ((budget - size(lo)) // noise)
        rng.shuffle(words)
        ids = list(head)
        for w in words:
            ids += self.encode(" " + w)
        return ids + tail, vocab[1 : answers + 1], []


def _answers_stand_out(counts: list[int], answers: int) -> bool:
    """fwe: words 1..answers (word 0 is the noise "...") occur, and more often than word answers+1."""
    last = counts[answers]
    return last >= 1 and (len(counts) <= answers + 1 or last > counts[answers + 1])


def _niah_text(template: str, kind: str, n_answers: int, query: str) -> str:
    """RULER's niah wording, in the singular when one value is asked for."""
    text = template
    if n_answers == 1:
        text = (text.replace("Some special", "A special").replace("What are all", "What is")
                .replace(" are hidden", " is hidden").replace(" are", " is"))
        kind = kind[:-1]  # numbers -> number
    return text.format(kind=kind, query=query)


# ---------------------------------------------------------------------------------------------
# Training documents


def answer_text(task: str, references: Sequence[str]) -> str:
    """A full answer that continues the prompt, in RULER's answer formats (training targets)."""
    if task == "vt":
        return ", ".join(references)  # the prompt ends with "they are: "
    if task == "cwe":
        return " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(references))
    return " " + ", ".join(references) + "."


def make_ruler_examples(
    tokenizer, tasks: Sequence[str], lengths: Sequence[int], n: int, seed: int = 0, haystack: Haystack | None = None
):
    """`n` samples per (task, length) as JSON-ready rows (what `data_prep/make_ruler.py` writes).

    Yields:
        {"id", "task", "length", "index", "input_ids", "references", "prompt", "answer", "text"}:
        `text` = prompt + answer, a document for (pre)training corpora.

    Raises:
        LongcptError: an unknown task or a length too short for one.
    """
    check_tasks(tasks)
    generator = RulerGenerator(tokenizer, haystack)
    for task in tasks:
        for length in lengths:
            for index in range(n):
                sample = generator.sample(task, length, index, seed)
                prompt = tokenizer.decode(sample.input_ids, skip_special_tokens=True)
                answer = answer_text(task, sample.references)
                yield {"id": f"{task}-{length}-{index}", "task": task, "length": length, "index": index,
                       "input_ids": sample.input_ids, "references": sample.references, "prompt": prompt,
                       "answer": answer, "text": prompt + answer}
