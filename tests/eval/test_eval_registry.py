"""An evaluation is one module plus one registry line: the command line finds its flags there,
and the shared pieces (model flags and loading, resumable rows, throughput) do the rest."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from longcpt.cli import main
from longcpt.eval import EVALS, register_eval

TOY = textwrap.dedent('''
    """`longcpt eval toy`: the loss of the first N tokens of a text, one row per text."""

    from longcpt.argtypes import positive_int


    def add_arguments(parser):
        from longcpt.eval.loading import add_model_arguments

        add_model_arguments(parser)
        parser.add_argument("--output", required=True)
        parser.add_argument("--texts", type=positive_int, default=3)


    def run(args):
        import torch

        from longcpt.eval.loading import load_for_eval
        from longcpt.eval.predictions import Predictions
        from longcpt.eval.throughput import Meter, cache_report
        from longcpt.fsio import atomic_write_json

        model, tokenizer, settings = load_for_eval(args)
        meter = Meter()
        with Predictions(args.output, settings, ("model",), lambda row: row["text"], "longcpt eval toy") as rows:
            for i in range(args.texts):
                if i in rows.done:
                    continue
                ids = torch.tensor([tokenizer.encode(f"The pass key is {i}{i}{i}. " * 4)])
                with torch.no_grad():
                    loss = float(model.loss(ids, torch.roll(ids, -1, 1)))
                meter.add(ids.numel(), {})
                rows.append({"text": i, "loss": loss})
            every = [rows.done[i] for i in range(args.texts)]
        atomic_write_json(f"{args.output}/toy.json", {"loss": sum(r["loss"] for r in every) / len(every),
                                                      **meter.report(), **cache_report(every)})
        return 0
''')


@pytest.fixture
def toy_eval(tmp_path, monkeypatch):
    (tmp_path / "toy_eval.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(EVALS, "toy", EVALS.get("toy", ("", "")))  # restored after the test
    register_eval("toy", "toy_eval", "a toy evaluation registered by the test")
    return "toy"


def test_a_new_evaluation_is_its_module_and_one_registry_line(toy_eval, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "toy", "--model", str(model_dir), "--output", str(out), "--texts", "2"]) == 0
    first = json.loads((out / "toy.json").read_text())
    assert first["generated"] == 2 and first["kv_kept"] is None and first["loss"] > 0
    assert main(["eval", "toy", "--model", str(model_dir), "--output", str(out), "--texts", "3"]) == 0
    assert json.loads((out / "toy.json").read_text())["generated"] == 1  # resumed: one new text
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "toy" in capsys.readouterr().out and "a toy evaluation registered by the test" in EVALS["toy"][1]


def test_every_registered_evaluation_declares_its_flags_and_the_shared_model_flags():
    import importlib

    for name, (module, help_text) in EVALS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run) and help_text, name
        parser = __import__("argparse").ArgumentParser()
        mod.add_arguments(parser)
        flags = {a for action in parser._actions for a in action.option_strings}
        assert {"--model", "--output", "--rope-scaling", "--attention", "--attention-options"} <= flags, name


def test_help_imports_no_evaluation_and_no_torch(subprocess_env):
    code = ("import sys, contextlib, io\n"
            "from longcpt.cli import build_parser\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    build_parser(['eval', '--help']).parse_args(['eval', '--help'])\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('longcpt.eval.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
