"""kill -9 at random points of a checkpoint save, 20 seeds: after each, the same command resumes from
a checkpoint that verifies, loses no complete checkpoint, and ends with the weights of an
uninterrupted run.

One recorded reference run lists every event of its saves (each write of the checkpoint file
with its offset, each fsync, rename, symlink and deletion: see kill_points.py). Each seed picks
one save and, with even odds, a byte offset of the checkpoint file or one of the other events;
a run of the same command is killed with SIGKILL there, then the same command runs again. The
runs are fork server children (real processes; no Python start-up per run)."""

import json
import random

import pytest
from fault_helpers import assert_same_weights, weights
from lit_helpers import tiny_overrides

from longcpt.manifest import verify

SEEDS = 20
STEPS = 4  # a checkpoint after every step, only the newest kept: every save also prunes


def command(out, tokenizer_dir):
    return ["--synthetic", *tiny_overrides(out, tokenizer_dir, trainer__max_steps=STEPS,
                                           trainer__save_every_n_steps=1, trainer__keep_last_k=1)]


@pytest.fixture(scope="module")
def reference(forkserver, tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("kill9")
    out = root / "run-ref"  # as long as the seeds' folder names: the same checkpoint sizes
    child = forkserver.run("run_train", command(out, tokenizer_dir), root / "ref.log",
                           hooks={"record": str(root / "events.jsonl")})
    assert child.returncode == 0, child.output()[-3000:]
    events = [json.loads(line) for line in (root / "events.jsonl").read_text().splitlines()]
    return {"root": root, "events": events, "final": weights(out / "checkpoints" / "last")}


def kill_point(seed: int, events: list[dict]) -> dict:
    rng = random.Random(seed)
    step = rng.randint(1, STEPS)
    mine = [e for e in events if e["step"] == step]
    writes = [e for e in mine if e["kind"] == "write"]
    if rng.random() < 0.5:
        size = writes[-1]["offset"] + writes[-1]["bytes"]
        at = rng.randrange(size)
        e = next(w for w in writes if w["offset"] <= at < w["offset"] + w["bytes"])
        return {"step": step, "index": e["index"], "bytes": at - e["offset"], "where": f"byte {at:,} of {size:,}"}
    e = rng.choice([e for e in mine if e["kind"] != "write"])
    return {"step": step, "index": e["index"], "bytes": 0, "where": f"{e['kind']} {e['detail']}"}


def committed(point: dict, events: list[dict]) -> bool:
    """Was the checkpoint renamed into place before the kill?"""
    name = f"step-{point['step']:08d}.ckpt"
    commit = next(e for e in events if e["step"] == point["step"] and e["kind"] == "replace"
                  and e["detail"] == f".{name}.tmp -> {name}")
    return point["index"] > commit["index"]


@pytest.mark.slow
def test_kill9_at_random_points_of_a_save(forkserver, reference, tokenizer_dir):
    root, events = reference["root"], reference["events"]
    outcomes = []
    for seed in range(SEEDS):
        point = kill_point(seed, events)
        out = root / f"run-s{seed:02d}"
        args = command(out, tokenizer_dir)
        killed = forkserver.run("run_train", args, root / f"s{seed:02d}-killed.log", hooks={"kill": point})
        resumed = forkserver.run("run_train", args, root / f"s{seed:02d}-resumed.log")
        log, ckpts = resumed.output(), out / "checkpoints"
        # The newest complete checkpoint before the kill: this step's once renamed, else the previous one.
        expected = point["step"] if committed(point, events) else point["step"] - 1
        resumed_from = next((int(line.split("step-")[1][:8]) for line in log.splitlines()
                             if line.startswith("resuming from ")), 0)
        exact = resumed.returncode == 0 and weights(ckpts / "last").keys() == reference["final"].keys()
        if exact:
            try:
                assert_same_weights(weights(ckpts / "last"), reference["final"])
            except AssertionError:
                exact = False
        outcomes.append({
            "seed": seed, "killed at": f"save of step {point['step']}, {point['where']}",
            "killed": killed.returncode == -9, "resumed from": resumed_from, "expected": expected,
            "lost": max(0, expected - resumed_from), "skipped damaged": "skipping checkpoint" in log,
            "verifies": verify(ckpts / "last") == [], "leftovers": sorted(p.name for p in ckpts.iterdir()
                                                                           if p.name.startswith(".")),
            "exact": exact,
        })
    report = "\n".join(json.dumps(o) for o in outcomes)
    print(report)
    print(f"faults tried: {SEEDS}; killed: {sum(o['killed'] for o in outcomes)}; resumed exactly: "
          f"{sum(o['exact'] for o in outcomes)}; complete checkpoints lost: {sum(o['lost'] for o in outcomes)}")
    assert all(o["killed"] for o in outcomes), report
    assert all(o["resumed from"] == o["expected"] and not o["skipped damaged"] for o in outcomes), report
    assert all(o["exact"] and o["verifies"] and not o["leftovers"] for o in outcomes), report
    # The seeds reach every save and both kinds of kill point.
    assert {o["killed at"].split(",")[0] for o in outcomes} == {f"save of step {s}" for s in range(1, STEPS + 1)}
    assert any("byte" in o["killed at"] for o in outcomes) and any("replace" in o["killed at"] for o in outcomes)
