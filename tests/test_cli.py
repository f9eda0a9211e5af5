"""The `longcpt` command: help for every command, one clear message for bad input."""

from __future__ import annotations

import argparse
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from longcpt.argtypes import csv_list
from longcpt.cli import main

DATA_PREP = Path(__file__).resolve().parents[1] / "data_prep"

COMMANDS = [["train"], ["plan"], ["export"], ["eval", "passkey"], ["eval", "booksum"], ["eval", "ppl"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_help_works(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: longcpt" in capsys.readouterr().out


@pytest.mark.subprocess
def test_python_dash_m_lists_the_commands(subprocess_env):
    out = subprocess.run(
        [sys.executable, "-m", "longcpt", "--help"], capture_output=True, text=True, env=subprocess_env()
    )
    assert out.returncode == 0
    for name in ("train", "plan", "export", "eval"):
        assert name in out.stdout


def test_bad_flag_value_exits_2_naming_it(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "passkey", "--model", "m", "--output", "o", "--lengths", "1k,2k"])
    assert e.value.code == 2
    assert "--lengths" in capsys.readouterr().err


def test_bad_recipe_is_one_message_no_traceback(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("trainer:\n  max_stepz: 3\n")
    code = main(["train", str(tmp_path / "r.yaml"), "optim.lr=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("longcpt train: error:")
    assert "Traceback" not in err


def test_csv_list_parses_lists_and_refuses_empty_ones():
    assert csv_list(int)("1024, 4096,") == [1024, 4096]  # blanks and a trailing comma skipped
    assert csv_list(str)("vt") == ["vt"]
    for text, message in (("", "expected a comma-separated list, got ''"), (" , ", "got ' , '"),
                          ("1k,2k", "expected comma-separated ints, got '1k,2k'")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            csv_list(int)(text)


@pytest.mark.parametrize("argv", [
    ["longcpt", "eval", "passkey", "--model", "m", "--output", "o", "--lengths", ","],
    ["longcpt", "eval", "ruler", "--model", "m", "--output", "o", "--tasks", ""],
    ["make_passkey.py", "--tokenizer", "t", "--lengths", "", "--depths", "0.5", "--n", "1", "--output", "o"],
    ["make_passkey.py", "--tokenizer", "t", "--lengths", "64", "--depths", ",", "--n", "1", "--output", "o"],
    ["make_ruler.py", "--tokenizer", "t", "--tasks", "", "--lengths", "64", "--n", "1", "--output", "o"],
    ["make_ruler.py", "--tokenizer", "t", "--tasks", "vt", "--lengths", ",", "--n", "1", "--output", "o"],
], ids=["eval passkey --lengths", "eval ruler --tasks", "make_passkey --lengths", "make_passkey --depths",
        "make_ruler --tasks", "make_ruler --lengths"])
def test_an_empty_list_is_the_same_error_in_the_cli_and_the_data_prep_scripts(argv, capsys):
    """One parser (argtypes.csv_list) for every comma-separated flag: an empty list is refused everywhere."""
    entry = main if argv[0] == "longcpt" else runpy.run_path(str(DATA_PREP / argv[0]))["main"]
    with pytest.raises(SystemExit) as e:
        entry(argv[1:])
    assert e.value.code == 2
    assert "expected a comma-separated list, got" in capsys.readouterr().err
