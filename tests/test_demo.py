"""`make demo` (`python -m longcpt.demo`): the quick plan end to end, resuming, the summary's numbers."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from longcpt.demo.pipeline import QUICK, TRAINING, Demo, split_overrides
from longcpt.demo.stages import StageRunner
from longcpt.demo.summary import loss_table, sparkline
from longcpt.lit.logs import read_metrics

STAGES = ["corpus", "tokenizer", "prepare", "pretrain", "ppl_before", "extend", "ppl_after", "passkey_data",
          "warmup", "finetune", "upto512", "upto2k", "passkey_eval"]


def demo(forkserver, output, *args, timeout=600):
    """`longcpt demo --quick` as a fork server child: (exit status, stdout, stderr)."""
    logs = output.parent / f"demo-{len(list(output.parent.glob('demo-*.out')))}"
    child = forkserver.run("longcpt.demo.pipeline", ["--quick", "--output", str(output), *args],
                           logs.with_suffix(".out"), err=logs.with_suffix(".err"), timeout=timeout)
    return child.returncode, child.output(), child.errors()


def reused(stdout: str) -> list[str]:
    """Titles of the stages a run skipped, as "[n/13] title"."""
    return re.findall(r"^(\[\d+/\d+\] .*): finished by an earlier run", stdout, flags=re.M)


@pytest.mark.slow
def test_quick_demo_runs_resumes_and_reports_what_it_measured(tmp_path, subprocess_env, forkserver):
    """The first run is `python -m longcpt.demo` as a user types it; the three that continue it are
    fork server children (the same `main`, without Python's start-up)."""
    out = tmp_path / "demo"
    first = subprocess.run([sys.executable, "-m", "longcpt.demo", "--quick", "--output", str(out), "--stop-after",
                            "extend"], capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "stopped after stage extend" in first.stdout
    assert sorted(p.stem for p in (out / "stages").glob("*.json")) == sorted(STAGES[:6])
    # As if killed after the extension's last checkpoint but before its marker: it runs again,
    # resuming the finished training run instead of starting over.
    (out / "stages" / "extend.json").unlink()

    code, stdout, stderr = demo(forkserver, out)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert [t.split("] ")[0] for t in reused(stdout)] == [f"[{i}/{len(STAGES)}" for i in range(1, 6)]
    assert f"resuming from {out / 'extend' / 'checkpoints'}" in stdout
    assert sorted(p.stem for p in (out / "stages").glob("*.json")) == sorted(STAGES)

    # Every training run exported; the extension raised rope_theta.
    for stage, (_, folder) in TRAINING.items():
        assert (out / folder / "hf" / "config.json").is_file(), stage
    theta = {s: json.loads((out / TRAINING[s][1] / "hf" / "config.json").read_text())["rope_theta"]
             for s in ("pretrain", "extend")}
    assert theta == {"pretrain": 10000.0, "extend": 100000.0}
    for png in ("loss.png", "ppl.png", "passkey/passkey.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png

    # The summary states this run's numbers: passkey per length, ppl before/after, losses, times.
    summary = (out / "summary.txt").read_text()
    assert summary in stdout
    passkey = json.loads((out / "passkey" / "passkey.json").read_text())
    assert list(passkey["by_length"]) == [str(n) for n in QUICK.passkey_lengths]
    assert "  " + "  ".join(f"{int(n)}: {a:.0%}" for n, a in passkey["by_length"].items()) in summary
    before = json.loads((out / "ppl_before" / "ppl.json").read_text())["buckets"]
    after = json.loads((out / "ppl_after" / "ppl.json").read_text())["buckets"]
    for b, a in zip(before, after):
        assert f"{b['start']:>6}-{b['end']:<6}  {b['ppl']:>8.1f}  {a['ppl']:>8.1f}" in summary
    losses = read_metrics(out / "pretrain")["train/loss"]
    last = max(losses)
    assert f"{losses[last]:.2f} (step {last + 1})" in summary
    for name in STAGES:
        assert re.search(rf"^\s+\d+ s\s+\d+ s  {name}\b", summary, flags=re.M), name

    # The answer-only fine-tune learns to read the key: a model that does not look at the prompt can
    # do no better than guess the digits of a random 5-digit key (first 1-9, then 0-9; EOS is free).
    floor = (math.log(9) + 4 * math.log(10)) / 6
    answer_loss = read_metrics(out / "passkey_finetune")["train/loss"]
    last = [answer_loss[step] for step in sorted(answer_loss)[-20:]]
    assert sum(last) / len(last) < floor - 0.1, (floor, last)
    assert "experiments/passkey_demo.sh" in summary and "recipes/anchor_llama3_8b_128k.yaml" in summary
    assert "longcpt plan recipes/" in summary

    # A third run finds everything done; other settings in the same folder are refused.
    code, stdout, _ = demo(forkserver, out)
    assert code == 0 and len(reused(stdout)) == len(STAGES)
    code, _, stderr = demo(forkserver, out, "trainer.max_steps=3")
    assert code == 2 and "other settings" in stderr and "--output" in stderr


def test_stage_runner_skips_finished_stages_and_reruns_unfinished_ones(tmp_path, capsys):
    calls = []

    def killed():
        raise KeyboardInterrupt

    runner = StageRunner(tmp_path, total=2, say=lambda text: None)
    assert runner("a", "first", lambda: calls.append("a") or {"n": 1}) == {"n": 1}
    with pytest.raises(KeyboardInterrupt):
        runner("b", "second", killed)
    assert not runner.marker("b").exists()  # a failed stage leaves no marker

    again = StageRunner(tmp_path, total=2, say=lambda text: None)
    assert again("a", "first", lambda: calls.append("a again")) == {"n": 1}
    assert again("b", "second", lambda: calls.append("b") or {"ok": True}) == {"ok": True}
    assert calls == ["a", "b"]
    assert [(t.name, t.reused) for t in again.times] == [("a", True), ("b", False)]
    assert "[1/2] first: finished by an earlier run" in capsys.readouterr().out


def test_bad_override_is_reported_before_any_stage_runs(tmp_path, capsys):
    from longcpt.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.max_stepz"):
        Demo(tmp_path / "demo", QUICK, ["finetune.trainer.max_stepz=3"]).run()
    assert not (tmp_path / "demo" / "stages").exists() and not (tmp_path / "demo" / "demo.json").exists()


def test_a_folder_made_with_other_recipes_is_refused(tmp_path):
    from longcpt.errors import LongcptError

    d = Demo(tmp_path / "demo", QUICK)
    d.out.mkdir()
    configs = {stage: d.config(stage, check_paths=False) for stage in TRAINING}
    d.check_settings(configs)
    d.check_settings(configs)  # the same settings again: accepted
    path = d.out / "demo.json"
    saved = json.loads(path.read_text())
    assert sorted(saved["recipes"]) == sorted(TRAINING)
    saved["recipes"]["finetune"] = "0" * 16  # as if recipes/tiny_cpu_passkey.yaml had changed since
    path.write_text(json.dumps(saved))
    with pytest.raises(LongcptError, match=r"other recipes for finetune \(recipes/ changed since that run\)"):
        d.check_settings(configs)
    other = Demo(tmp_path / "demo", QUICK, ["trainer.max_steps=3"])
    with pytest.raises(LongcptError, match="other settings"):
        other.check_settings({stage: other.config(stage, check_paths=False) for stage in TRAINING})
    del saved["recipes"]  # a folder of a version that did not record them
    path.write_text(json.dumps(saved))
    with pytest.raises(LongcptError, match="older longcpt that did not record its recipes"):
        d.check_settings(configs)


def test_overrides_go_to_one_stage_or_to_all():
    split = split_overrides(["trainer.max_steps=5", "extend.optim.lr=5e-4", "warmup.data.micro_batch_size=2"])
    assert split["pretrain"] == ["trainer.max_steps=5"]
    assert split["extend"] == ["trainer.max_steps=5", "optim.lr=5e-4"]
    assert split["warmup"] == ["trainer.max_steps=5", "data.micro_batch_size=2"]
    assert split["finetune"] == ["trainer.max_steps=5"]


def test_sparkline():
    assert sparkline([3, 2, 1]) == "█▅▁"
    assert sparkline([5.0, 5.0]) == "▁▁"
    assert sparkline([]) == ""
    line = sparkline(list(range(100, 0, -1)), width=10)
    assert len(line) == 10 and line[0] == "█" and line[-1] == "▁"


def test_loss_table_rows_at_validation_steps():
    train = [(s, 10.0 - s / 10) for s in range(10, 101, 10)]
    val = [(50, 6.0), (100, 5.0)]
    rows = loss_table(train, val)
    assert rows[1].split() == ["50", "5.000", "6.000"] and rows[2].split() == ["100", "0.000", "5.000"]


def test_read_metrics_merges_launches_later_wins(tmp_path):
    for version, rows in ((0, ["0,4,7.5,", "0,9,7.0,", "0,9,,6.9"]), (1, ["0,9,6.8,", "0,14,6.5,"])):
        folder = tmp_path / "logs" / "csv" / f"version_{version}"
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text("epoch,step,train/loss,val/loss\n" + "\n".join(rows) + "\n")
    m = read_metrics(tmp_path)
    assert m == {"train/loss": {4: 7.5, 9: 6.8, 14: 6.5}, "val/loss": {9: 6.9}}
    assert read_metrics(tmp_path / "nothing") == {}
