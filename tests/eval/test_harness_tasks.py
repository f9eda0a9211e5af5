"""`longcpt eval harness` runs real harness tasks from local files, offline, and their metrics reach
the report.

Task YAMLs in an --include-path folder include the harness's own task configs (prompt, generation
settings, scoring functions: LongBench's qa_f1 / rouge / classification, LongBench v2's and MMLU's
multiple choice, RULER's niah with its noise haystack) and point them at small local files in each
benchmark's record format. Each test runs the command twice in one output folder:

  1. the tiny model answers every request (our backend end to end: prompts, generation, the
     harness's files, results.json, run.json);
  2. the answers in the harness's response cache are replaced by known predictions and the
     command runs again, finding every request answered: the metrics in results.json and in the
     harness's results file are then the harness's scores of those predictions, compared with
     values worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import bpe_tokenizer, tiny_llama

pytest.importorskip("lm_eval")
import lm_eval.tasks  # noqa: E402
from lm_eval.api.model import hash_args  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from longcpt.cli import main  # noqa: E402

HARNESS_TASKS = Path(lm_eval.tasks.__file__).parent
CLASSES = ["Location", "Number", "Person", "Description"]


def longbench_record(i: int, dataset: str, question: str, context: str, answers: list[str],
                     all_classes: list[str] | None = None) -> dict:
    """A record in LongBench's own format (THUDM/LongBench data files); record `i` has a prompt of its own."""
    return {"input": question, "context": f"Record {i}. {context}", "answers": answers, "all_classes": all_classes,
            "length": len(context.split()), "dataset": dataset, "language": "en", "_id": f"{dataset}-{i}"}


LONGBENCH = {
    # harness task -> (records, known predictions, metric, its value worked out by hand)
    "hotpotqa": (
        [longbench_record(i, "hotpotqa", "Which case set the obscenity test?",
                          "Passage 1: The grass is green. Passage 2: Miller v. California set the test.",
                          ["Miller v. California"]) for i in range(3)],
        # normalised: "miller case in california" vs "miller v california": 2 common tokens,
        # P = 2/4, R = 2/3, F1 = 2PR/(P+R) = 4/7; then an exact answer (1) and nothing (0)
        ["the Miller case in California", "Miller v. California", ""],
        "qa_f1_score", (4 / 7 + 1 + 0) / 3,
    ),
    "gov_report": (
        [longbench_record(i, "gov_report", "", "The report says one cat was on this mat.",
                          ["one cat was on this mat"]) for i in range(2)],
        # ROUGE-L: LCS "one cat on this mat" = 5 of 6 words both ways, F = 5/6; then no overlap
        ["one cat sat on this mat", "dogs"],
        "rouge_score", (5 / 6 + 0) / 2,
    ),
    "trec": (
        [longbench_record(i, "trec", "Where is the sky?", "Question: Who is he?\nType: Person",
                          ["Location"], CLASSES) for i in range(3)],
        # the class named alone (1), two classes named, one right (1/2), a wrong class (0)
        ["Location", "Number or Location", "Person"],
        "classification_score", (1 + 0.5 + 0) / 3,
    ),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness_tasks_model")
    tokenizer = bpe_tokenizer(300, add_bos=True)
    tiny_llama(len(tokenizer), seed=0, max_position_embeddings=1024).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def offline(monkeypatch, tmp_path, one_thread):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_yaml(folder: Path, name: str, include: Path, data: Path, **overrides) -> None:
    """A task that is the harness's `include` on local `data`, with `overrides` (JSON is valid YAML)."""
    lines = [f"include: {include}", f"task: {name}", "tag: []", "dataset_path: json", "dataset_name: null",
             "test_split: test", "dataset_kwargs:", "  data_files:", f"    test: {data}"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in overrides.items()]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def run_harness(model: Path, out: Path, tasks: list[str], include: Path, *extra: str) -> dict:
    code = main(["eval", "harness", "--model", str(model), "--tasks", ",".join(tasks), "--include-path", str(include),
                 "--output", str(out), "--max-length", "1024", "--gen-kwargs", '{"max_gen_toks": 6}', *extra])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def replace_responses(out: Path, task: str, known: dict[int, object], request_type: str) -> None:
    """Put `known[doc_id]` in the response cache for the requests of `task`'s documents, then remove
    the finished task so that the next run scores it again from the cache."""
    from sqlitedict import SqliteDict

    samples = [json.loads(line) for f in (out / task).glob("samples_*.jsonl") for line in f.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == sorted(known)
    with SqliteDict(str(out / "responses_rank0.db"), autocommit=True) as db:
        for sample in samples:
            for i, (_, request) in enumerate(sorted(sample["arguments"].items())):
                args = (request["arg_0"], request["arg_1"])
                response = known[sample["doc_id"]]
                db[hash_args(request_type, args)] = response[i] if request_type == "loglikelihood" else response
    summary = json.loads((out / "results.json").read_text())
    del summary["tasks"][task]
    (out / "results.json").write_text(json.dumps(summary))
    for f in (out / task).iterdir():
        f.unlink()


def metric(summary: dict, task: str, name: str) -> float:
    return summary["tasks"][task]["results"][task][f"{name},none"]


@pytest.mark.slow
def test_longbench_qa_summarisation_and_classification(model, tmp_path, offline):
    tasks_dir, out = tmp_path / "tasks", tmp_path / "out"
    tasks_dir.mkdir()
    for task, (records, _, _, _) in LONGBENCH.items():
        harness = HARNESS_TASKS / "longbench" / f"{task}.yaml"
        prompt = load_yaml(harness, resolve_func=False)["doc_to_text"].replace("{{question}}", "{{input}}")
        task_yaml(tasks_dir, f"lb_{task}", harness, write_jsonl(tmp_path / f"{task}.jsonl", records), doc_to_text=prompt)
    names = [f"lb_{t}" for t in LONGBENCH]

    first = run_harness(model, out, names, tasks_dir)
    run = json.loads((out / "run.json").read_text())
    assert run["attention"] == "full" and run["max_length"] == 1024 and run["versions"]["lm_eval"]
    for task, (records, _, name, _) in LONGBENCH.items():
        row = first["tasks"][f"lb_{task}"]
        assert row["n_samples"][f"lb_{task}"]["effective"] == len(records)
        assert row["tokens"] > 0 and row["tokens_per_second"] > 0
        samples = [json.loads(x) for f in (out / f"lb_{task}").glob("samples_*.jsonl") for x in f.read_text().splitlines()]
        assert records[0]["context"] in samples[0]["arguments"]["gen_args_0"]["arg_0"]  # our prompt, from the record
        assert 0.0 <= metric(first, f"lb_{task}", name) <= 1.0

    for task, (_, predictions, _, _) in LONGBENCH.items():
        replace_responses(out, f"lb_{task}", dict(enumerate(predictions)), "generate_until")
    second = run_harness(model, out, names, tasks_dir)
    for task, (_, _, name, expected) in LONGBENCH.items():
        assert metric(second, f"lb_{task}", name) == pytest.approx(expected, abs=1e-6)
        assert metric(second, f"lb_{task}", "score") == pytest.approx(expected, abs=1e-6)
        assert second["tasks"][f"lb_{task}"]["tokens"] == 0  # every answer came from the cache
        harness_file = json.loads(next((out / f"lb_{task}").glob("results_*.json")).read_text())
        assert harness_file["results"][f"lb_{task}"][f"{name},none"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_longbench_v2_and_mmlu_multiple_choice(model, tmp_path, offline):
    tasks_dir, out = tmp_path / "tasks", tmp_path / "out"
    tasks_dir.mkdir()
    v2 = [{"_id": f"v2-{i}", "domain": "Single-Document QA", "sub_domain": "Detective", "difficulty": "easy",
           "length": "short", "question": f"Who took key {i}?", "choices": ["the cook", "the maid", "the cat", "the sun"],
           "answer": answer, "context": "The grass is green. The maid took the key. The sky is blue."}
          for i, answer in enumerate(["A", "B"])]
    mmlu = [{"question": f"Question {i}: what colour is the sky?", "subject": "astronomy",
             "choices": ["blue", "green", "yellow", "red"], "answer": answer} for i, answer in enumerate([0, 1, 2])]
    task_yaml(tasks_dir, "lb2_detective", HARNESS_TASKS / "longbench2" / "_longbench_common_yaml",
              write_jsonl(tmp_path / "v2.jsonl", v2))
    task_yaml(tasks_dir, "mmlu_local", HARNESS_TASKS / "mmlu" / "default" / "_default_template_yaml",
              write_jsonl(tmp_path / "mmlu.jsonl", mmlu), fewshot_split=None)

    first = run_harness(model, out, ["lb2_detective", "mmlu_local"], tasks_dir)
    assert 0.0 <= metric(first, "mmlu_local", "acc") <= 1.0 and first["tasks"]["mmlu_local"]["tokens"] > 0

    # (log-likelihood, greedy) of " A" .. " D" per document
    def choices(best: int) -> list[tuple[float, bool]]:
        return [(-1.0 if c == best else -2.0 - c, c == best) for c in range(4)]

    replace_responses(out, "lb2_detective", {0: choices(0), 1: choices(0)}, "loglikelihood")  # right, wrong
    replace_responses(out, "mmlu_local", {0: choices(0), 1: choices(1), 2: choices(0)}, "loglikelihood")  # 2 of 3
    second = run_harness(model, out, ["lb2_detective", "mmlu_local"], tasks_dir)
    assert metric(second, "lb2_detective", "acc") == pytest.approx(1 / 2)
    assert metric(second, "mmlu_local", "acc") == pytest.approx(2 / 3)


@pytest.mark.slow
def test_ruler_niah_with_the_noise_haystack(model, tmp_path, offline, monkeypatch):
    """The harness builds niah_single_1 with the model's tokenizer (passed as metadata) and its noise
    haystack, which needs no download (nltk's sentence splitter is for the essay haystack only)."""
    nltk_data = tmp_path / "nltk_data"
    (nltk_data / "tokenizers" / "punkt_tab").mkdir(parents=True)  # what the module checks at import
    monkeypatch.setenv("NLTK_DATA", str(nltk_data))
    tasks_dir, out = tmp_path / "tasks", tmp_path / "out"
    tasks_dir.mkdir()
    aggregate = "!function lm_eval.tasks.ruler.common_utils.aggregate_metrics"
    (tasks_dir / "niah.yaml").write_text(
        f"include: {HARNESS_TASKS / 'ruler' / 'niah_single_1.yaml'}\ntask: niah_local\ntag: []\nmetric_list:\n"
        + "".join(f'  - metric: "{n}"\n    aggregation: {aggregate}\n    higher_is_better: true\n' for n in (512, 4096))
    )
    extra = ("--metadata", '{"max_seq_lengths": [512]}', "--limit", "2")
    first = run_harness(model, out, ["niah_local"], tasks_dir, *extra)
    assert 0.0 <= metric(first, "niah_local", "512") <= 1.0
    samples = [json.loads(x) for f in (out / "niah_local").glob("samples_*.jsonl") for x in f.read_text().splitlines()]
    prompt = samples[0]["arguments"]["gen_args_0"]["arg_0"]
    assert "The grass is green. The sky is blue." in prompt and samples[0]["doc"]["max_length"] == 512
    value = {s["doc_id"]: s["doc"]["outputs"][0] for s in samples}
    replace_responses(out, "niah_local", {0: f" {value[0]}.", 1: " 1234567."}, "generate_until")  # found, not found
    second = run_harness(model, out, ["niah_local"], tasks_dir, *extra)
    assert metric(second, "niah_local", "512") == pytest.approx(1 / 2)
    assert metric(second, "niah_local", "4096") == -1  # no sample of that length


@pytest.mark.slow
def test_resuming_with_other_settings_is_refused(model, tmp_path, offline, capsys):
    tasks_dir, out = tmp_path / "tasks", tmp_path / "out"
    tasks_dir.mkdir()
    records = LONGBENCH["trec"][0][:1]
    harness = HARNESS_TASKS / "longbench" / "trec.yaml"
    prompt = load_yaml(harness, resolve_func=False)["doc_to_text"].replace("{{question}}", "{{input}}")
    task_yaml(tasks_dir, "lb_trec", harness, write_jsonl(tmp_path / "trec.jsonl", records), doc_to_text=prompt)
    run_harness(model, out, ["lb_trec"], tasks_dir)
    code = main(["eval", "harness", "--model", str(model), "--tasks", "lb_trec", "--include-path", str(tasks_dir),
                 "--output", str(out), "--max-length", "512"])
    assert code == 2
    assert "max_length: 1024 -> 512" in capsys.readouterr().err
