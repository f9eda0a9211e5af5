"""The `longcpt` lm-evaluation-harness backend answers requests as the harness's `hf` backend does.

One folder, a tiny Llama written by transformers itself with a BOS-adding BPE tokenizer, is read by
`HFLM` (the reference) and by `LongcptLM`: log-likelihoods agree within 1e-4 in fp32 with the same
greedy flags, rolling log-likelihoods too, and greedy generations are the same text. The requests
reach every rule the two must share: an empty context, contexts longer than max_length (cut from
the left), multiple choice sharing a context (one run per group), continuations that are the
model's own greedy tokens, several rolling windows, stop strings and max_gen_toks.
"""

from __future__ import annotations

import pytest
import torch
from tiny import bpe_tokenizer, tiny_llama

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from longcpt.errors import LongcptError  # noqa: E402
from longcpt.eval.harness.backend import UNBOUNDED, LongcptLM  # noqa: E402
from longcpt.model.attention import reads_any_length  # noqa: E402
from longcpt.model.generation import generate  # noqa: E402

MAX_LENGTH = 48  # the model's max_position_embeddings: short, so that truncation and windows happen
CONTEXTS = [
    "The grass is",
    "Here we go. " * 12,  # ~50 tokens: longer than max_length
    "What is the pass key? The pass key is",
    "I will quiz you about the important information there.",
]
CONTINUATIONS = [" green.", " There and back again.", " 12345.", " Remember it."]


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness_backend")
    tokenizer = bpe_tokenizer(300, add_bos=True)
    tiny_llama(len(tokenizer), seed=0, max_position_embeddings=MAX_LENGTH).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reference = HFLM(pretrained=str(folder), dtype="float32", batch_size=1, device="cpu")
    ours = LongcptLM(str(folder), progress=False)
    yield reference, ours, folder
    torch.set_num_threads(threads)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_the_harness_finds_the_backend_by_name():
    """`python -m longcpt.eval.harness` imports the backend before handing over to lm_eval's command
    line, which then finds `--model longcpt` in its registry."""
    from lm_eval.api.registry import get_model

    import longcpt.eval.harness.__main__  # noqa: F401

    assert get_model("longcpt") is LongcptLM


def test_max_length_is_the_model_context(backends):
    reference, ours, _ = backends
    assert ours.max_length == reference.max_length == MAX_LENGTH
    assert ours.prefix_token_id == reference.prefix_token_id == 1  # BOS


def test_loglikelihoods_equal_hf(backends):
    reference, ours, _ = backends
    pairs = [(c, x) for c in CONTEXTS for x in CONTINUATIONS]  # every context with every continuation
    pairs += [("", "Here we go."), ("The sky is", " blue."), ("The sky is", " B"), ("The sky is", " C"),
              ("<s>The sky is", " blue.")]  # a written BOS: no second one
    expected = reference.loglikelihood(requests("loglikelihood", pairs))
    got = ours.loglikelihood(requests("loglikelihood", pairs))
    assert ours.stats["truncated"] > 0  # the long context was cut from the left
    assert [g for _, g in got] == [g for _, g in expected]
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, expected)) < 1e-4
    assert len({round(lp, 3) for lp, _ in got}) > len(pairs) // 2  # distinct scores, not one constant


def test_requests_that_split_the_same_tokens_differently(backends):
    """"The grass is" + " green." and "" + "The grass is green." share context + continuation[:-1],
    so both backends run them once; hf's logits cache then reads the first positions of the longer
    continuation for the shorter one. Ours reads its last positions: the value hf computes without
    that cache."""
    reference, ours, folder = backends
    pairs = [("The grass is", " green."), ("", "The grass is green.")]
    uncached = HFLM(pretrained=str(folder), dtype="float32", batch_size=1, device="cpu", logits_cache=False)
    expected = uncached.loglikelihood(requests("loglikelihood", pairs))
    got = ours.loglikelihood(requests("loglikelihood", pairs))
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    cached = reference.loglikelihood(requests("loglikelihood", pairs))
    assert abs(cached[0][0] - expected[0][0]) > 0.1  # hf's shortcut gives another number here


def test_greedy_continuations_are_greedy_for_both(backends):
    """Continuations made of the model's own greedy tokens: is_greedy True, from token ids."""
    reference, ours, _ = backends
    token_requests = []
    for context in CONTEXTS[:1] + CONTEXTS[2:]:
        ids = ours.tok_encode(context)
        greedy = generate(ours.model, torch.tensor([ids]), 5)[0].tolist()
        token_requests += [(None, ids, greedy), (None, ids, greedy[:-1] + [(greedy[-1] + 1) % 300])]
    expected = reference._loglikelihood_tokens(token_requests)
    got = ours._loglikelihood_tokens(token_requests)
    assert [g for _, g in got] == [g for _, g in expected] == [True, False] * 3
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, expected)) < 1e-4


def test_rolling_loglikelihoods_equal_hf(backends):
    reference, ours, _ = backends
    texts = ["The grass is green. The sky is blue. " * 8, "Hi", "There and back again."]  # 3+ windows, 1, 1
    expected = reference.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(ours.tok_encode(texts[0])) > 2 * MAX_LENGTH


@pytest.mark.parametrize("batch_size", [1, None])
def test_greedy_generations_equal_hf(backends, batch_size):
    reference, ours, _ = backends
    ours.batch_rows = batch_size
    free = ours.generate_until(requests("generate_until", [(CONTEXTS[0], {"max_gen_toks": 16, "until": []})]))[0]
    stop = free[len(free) // 2 : len(free) // 2 + 2]  # two characters the free generation reaches mid-way
    assert stop and stop not in free[: len(free) // 2]
    args = [(c, {"max_gen_toks": 16, "until": [stop]}) for c in CONTEXTS]
    args += [(c, {"max_gen_toks": 7, "until": ["\n\n"], "do_sample": False, "temperature": 0.0}) for c in CONTEXTS]
    args += [("The sky is", {"max_gen_toks": 16, "until": [stop]}), ("The sun is", {"max_gen_toks": 16, "until": [stop]}),
             ("<s>The sky is", {"max_gen_toks": 16, "until": [stop]})]
    expected = reference.generate_until(requests("generate_until", args))
    got = ours.generate_until(requests("generate_until", args))
    assert got == expected
    assert got[0] == free[: free.index(stop)]  # cut before the stop string
    assert ours.stats["truncated"] > 0
    ours.stats["tokens"] = 0
    ours.generate_until(requests("generate_until", args[:1]))
    assert ours.stats["tokens"] < len(ours.tok_encode(CONTEXTS[0])) + 16  # it stopped at the string


@pytest.mark.parametrize("attention, options", [
    ("infllm", {"n_local": 64, "n_init": 4, "block_size": 8, "topk": 2, "exc_block_size": 16}),
    ("streaming", {"cache_size": 64, "sinks": 4}),
])
def test_memory_kinds_equal_hf_within_their_window(backends, attention, options):
    """InfLLM and StreamingLLM equal full attention while the input fits their window (cut as `hf`
    cuts it: max_length given)."""
    reference, _, folder = backends
    kind = LongcptLM(str(folder), attention=attention, attention_options=options, max_length=MAX_LENGTH,
                     progress=False)
    assert kind.settings["attention"] == attention
    pairs = [(c, x) for c in CONTEXTS for x in CONTINUATIONS[:2]]
    expected = reference.loglikelihood(requests("loglikelihood", pairs))
    got = kind.loglikelihood(requests("loglikelihood", pairs))
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, expected)) < 1e-4
    args = [(c, {"max_gen_toks": 10, "until": ["\n\n"]}) for c in CONTEXTS]
    assert kind.generate_until(requests("generate_until", args)) == reference.generate_until(
        requests("generate_until", args))


@pytest.mark.parametrize("attention, options", [("streaming", {"cache_size": 32}), ("h2o", {"cache_size": 32}),
                                                ("infllm", {})])
def test_kinds_that_read_any_length_get_whole_inputs_by_default(backends, attention, options):
    """A memory's evaluation reads past the window unless max_length says otherwise; full keeps the window."""
    _, _, folder = backends
    kind = LongcptLM(str(folder), attention=attention, attention_options=options, progress=False)
    full = LongcptLM(str(folder), progress=False)
    assert kind.max_length == kind.settings["max_length"] == UNBOUNDED and full.max_length == MAX_LENGTH
    assert reads_any_length("infini") and not reads_any_length("full") and not reads_any_length("anchor")
    long = [(CONTEXTS[1], " blue.")]  # longer than the window
    kind.loglikelihood(requests("loglikelihood", long))
    full.loglikelihood(requests("loglikelihood", long))
    assert kind.stats["truncated"] == 0 and full.stats["truncated"] == 1
    assert kind.stats["tokens"] > full.stats["tokens"]


def test_model_args_of_the_harness_command_line(backends):
    """What `--model_args` may hold: a dtype, JSON options as a string; anything else is named."""
    _, _, folder = backends
    lm = LongcptLM(str(folder), dtype="bfloat16", attention="streaming", attention_options='{"cache_size": 32}',
                   device="cuda:0", batch_size="auto:4", progress=False)
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.settings["attention_options"]["cache_size"] == 32 and lm.device.type in ("cpu", "cuda")
    with pytest.raises(LongcptError, match="model_args parallelize: not arguments of the longcpt backend"):
        LongcptLM(str(folder), parallelize=True)
