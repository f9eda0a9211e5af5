"""An exported folder runs in EleutherAI's lm-evaluation-harness (`lm_eval --model hf`) and the harness
computes our model's numbers: its Python API on a local YAML task over a local jsonl, no download.

The plain export (`LlamaForCausalLM`) and the Infini export (its own code, `trust_remote_code=True`)
are both checked: per-choice log-likelihoods equal those of longcpt's model on the same tokens, so
the accuracy the harness reports is the one our model earns.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import BOS, EOS, PAD, bpe_tokenizer, tiny_args

from longcpt.export.hf import save_pretrained
from longcpt.model import CausalLM, from_pretrained

DOCS = [
    {"question": "The grass is", "choices": ["green.", "blue.", "yellow."], "answer": 0},
    {"question": "The sky is", "choices": ["green.", "blue.", "yellow."], "answer": 1},
    {"question": "The sun is", "choices": ["green.", "blue.", "yellow."], "answer": 2},
    {"question": "What is the pass key? The pass key is", "choices": ["12345.", "67890.", "31415."], "answer": 0},
    {"question": "Here we go. There and back", "choices": ["again.", "there.", "text."], "answer": 0},
]
TASK_YAML = """\
task: longcpt_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def tiny_model(vocab: int, attention: str) -> CausalLM:
    torch.manual_seed(0)
    options = {"segment_len": 4} if attention == "infini" else {}  # prompts span several segments
    model = CausalLM(tiny_args(vocab_size=vocab, max_position_embeddings=128, bos_token_id=BOS, eos_token_id=EOS,
                               pad_token_id=PAD, attention=attention, attention_options=options))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".core.gate"):
                p.uniform_(-1.0, 1.0)  # Infini: the memory read matters
    return model.eval()


def our_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """What the harness asks a causal model for, computed with longcpt: log p(continuation | context),
    the two split as the harness splits them (encode the whole, the context's tokens first)."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).float(), dim=-1)[0]  # (T, V)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


@pytest.fixture
def one_thread():
    """Dozens of forward passes of a 32-wide model: one thread is faster than several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.subprocess
@pytest.mark.parametrize("attention", ["full", "infini"])
def test_harness_scores_an_export_with_our_loglikelihoods(tmp_path, monkeypatch, attention, one_thread):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tokenizer = bpe_tokenizer(200)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    folder = save_pretrained(tiny_model(len(tokenizer), attention), tmp_path / "export", tokenizer=tmp_path / "tokenizer")
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))

    model_args = f"pretrained={folder},dtype=float32" + (",trust_remote_code=True" if attention == "infini" else "")
    results = simple_evaluate(
        model="hf", model_args=model_args, tasks=["longcpt_tiny_mc"], device="cpu", batch_size=1,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False), log_samples=True,
    )

    ours = from_pretrained(folder).eval()
    assert ours.args.attention == attention
    samples = sorted(results["samples"]["longcpt_tiny_mc"], key=lambda s: s["doc_id"])
    correct = 0
    for doc, sample in zip(DOCS, samples, strict=True):
        expected = [our_loglikelihood(ours, tokenizer, doc["question"], " " + c) for c in doc["choices"]]
        got = [resp[0][0] for resp in sample["resps"]]  # [[(loglikelihood, is_greedy)], ...] per choice
        assert got == pytest.approx(expected, abs=1e-4)
        correct += max(range(len(expected)), key=expected.__getitem__) == doc["answer"]
    acc = results["results"]["longcpt_tiny_mc"]["acc,none"]
    assert math.isclose(acc, correct / len(DOCS))
