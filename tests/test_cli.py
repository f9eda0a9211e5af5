"""The `longcpt` command: help for every command, one clear message for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from longcpt.cli import main

COMMANDS = [["train"], ["plan"], ["export"], ["eval", "passkey"], ["eval", "booksum"], ["eval", "ppl"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_help_works(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: longcpt" in capsys.readouterr().out


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
