"""Atomic outputs: whole or absent, with the permissions a plain write would give."""

from __future__ import annotations

import json
import os
import stat

import pytest

from longcpt.errors import LongcptError
from longcpt.fsio import atomic_dir, atomic_file, atomic_write_json, atomic_write_text, record_settings


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_folders_get_the_usual_permissions(tmp_path, umask_022):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(atomic_write_text(tmp_path / "a.txt", "x")) == _mode(plain) == 0o644
    assert _mode(atomic_write_json(tmp_path / "a.json", {"a": 1})) == 0o644
    with atomic_dir(tmp_path / "folder") as d:
        (d / "f").write_text("x")
    assert _mode(tmp_path / "folder") == 0o755


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "r.json", "old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_figures_are_written_the_same_way(tmp_path, umask_022):
    from longcpt.eval.figures import passkey_heatmap

    png = passkey_heatmap([1024, 2048], [0.0, 1.0], [[1.0, 0.5], [0.0, 1.0]], "t", tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and _mode(png) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_record_settings_refuses_what_the_rule_refuses_and_records_the_rest(tmp_path):
    path = tmp_path / "run.json"
    seen = []

    def only_seed(before, now):  # the caller's rule: here, only `seed` may not change
        seen.append((before, now))
        return f"other seed ({before['seed']} -> {now['seed']})" if before["seed"] != now["seed"] else None

    record_settings(path, {"seed": 0, "lengths": (1, 2)}, only_seed)
    assert seen == [] and json.loads(path.read_text()) == {"seed": 0, "lengths": [1, 2]}  # first run: recorded
    record_settings(path, {"seed": 0, "lengths": (3,)}, only_seed)  # allowed by the rule: recorded
    assert seen[-1] == ({"seed": 0, "lengths": [1, 2]}, {"seed": 0, "lengths": [3]})  # tuples as read back
    assert json.loads(path.read_text())["lengths"] == [3]
    with pytest.raises(LongcptError, match=r"^other seed \(0 -> 1\)$"):
        record_settings(path, {"seed": 1, "lengths": [3]}, only_seed)
    assert json.loads(path.read_text()) == {"seed": 0, "lengths": [3]}  # a refused run records nothing
    for text in ("{not json", "[1, 2]"):
        path.write_text(text)
        with pytest.raises(LongcptError, match=f"{path}: not a settings file"):
            record_settings(path, {"seed": 0}, only_seed)
