"""A full disk while saving: one message (path, bytes needed, free space), the partial checkpoint
removed, the previous one still `last`, the run stopped; once space is freed the same command
resumes exactly.

The run folder sits on a real 40 MB tmpfs when this process may mount one (root), so the kernel
itself returns ENOSPC. Otherwise (or with FAULTS_MOCK_DISK=1) a mocked filesystem stands in at
the write call: the free space reported and the bytes accepted by the checkpoint file's writes,
with a short write then ENOSPC as the kernel does."""

import errno
import os
import shutil
import subprocess

import pytest
from fault_helpers import STEPS, assert_same_weights, run, weights
from lit_helpers import tiny_overrides

from longcpt.errors import LongcptError
from longcpt.lit import checkpoint_io, checkpoints

KIB = 1024


class Disk:
    """A small filesystem for the run folder: a real tmpfs, or a mocked one (see the module doc)."""

    def __init__(self, path, monkeypatch):
        self.path, self.monkeypatch, self.filler = path, monkeypatch, path / "filler"
        path.mkdir()
        self.real = os.environ.get("FAULTS_MOCK_DISK") != "1" and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(path)], capture_output=True).returncode == 0
        if not self.real:
            self.left = float("inf")
            monkeypatch.setattr(checkpoint_io, "free_bytes", lambda folder: int(min(self.left, 1 << 40)))
            monkeypatch.setattr(checkpoints, "free_bytes", lambda folder: int(min(self.left, 1 << 40)))
            init = checkpoint_io._HashingWriter.__init__
            monkeypatch.setattr(checkpoint_io._HashingWriter, "__init__",
                                lambda w, f: init(w, _LimitedFile(f, self)))

    def fill(self, leave: int) -> None:
        """Leave only `leave` bytes free."""
        if self.real:
            with open(self.filler, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(self.path).free - leave)
        else:
            self.left = leave

    def free_up(self) -> None:
        if self.real:
            self.filler.unlink()
        else:
            self.left = float("inf")

    def unmount(self) -> None:
        if self.real:
            subprocess.run(["umount", "-l", str(self.path)], check=True)


class _LimitedFile:
    """The mocked filesystem's file: accepts writes until the space is gone, then ENOSPC."""

    def __init__(self, f, disk):
        self.f, self.disk, self.name = f, disk, f.name

    def write(self, data):
        if self.disk.left <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = int(min(len(data), self.disk.left))
        self.disk.left -= n
        return self.f.write(data[:n])

    def flush(self):
        self.f.flush()


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = Disk(tmp_path / "disk", monkeypatch)
    yield d
    d.unmount()


def fill_when_writing(disk, monkeypatch, step, leave):
    """Fill the disk the moment the checkpoint of `step` starts being written (after the checks), once."""
    init, fired = checkpoint_io._HashingWriter.__init__, []

    def hooked(w, f):
        if f"step-{step:08d}" in str(f.name) and not fired:
            fired.append(step)
            disk.fill(leave)
        init(w, f)

    monkeypatch.setattr(checkpoint_io._HashingWriter, "__init__", hooked)


def assert_nothing_half_written(ckpts, kept_last):
    assert os.readlink(ckpts / "last") == kept_last
    left = sorted(p.name for p in ckpts.iterdir())
    assert left == ["last", kept_last, kept_last + ".manifest.json"], left  # no temporary, no step 4


@pytest.mark.subprocess
def test_disk_fills_during_a_save(disk, tokenizer_dir, monkeypatch, uninterrupted):
    out = disk.path / "run"
    fill_when_writing(disk, monkeypatch, 4, leave=300 * KIB)
    with pytest.raises(LongcptError) as e:
        run(out, tokenizer_dir, trainer__max_steps=STEPS)
    ckpts = out / "checkpoints"
    msg = str(e.value)
    assert msg.startswith(f"cannot save checkpoint {ckpts / 'step-00000004.ckpt'}: No space left on device "
                          "after writing "), msg
    assert " of about " in msg and " KiB (" in msg and " free in " in msg  # bytes needed and free
    assert f"The previous checkpoint {ckpts / 'step-00000002.ckpt'} is still `last`; the partial checkpoint " \
           "was removed. Free space" in msg
    assert_nothing_half_written(ckpts, "step-00000002.ckpt")

    disk.free_up()
    result = run(out, tokenizer_dir, trainer__max_steps=STEPS)
    assert result.global_step == STEPS
    assert_same_weights(weights(ckpts / "last"), uninterrupted)


@pytest.mark.subprocess
def test_too_little_space_refuses_before_writing(disk, tokenizer_dir, uninterrupted):
    """Less free space than the previous checkpoint took: refused before a byte is written."""
    from lightning.pytorch.callbacks import Callback

    class FillAfterStep2(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                disk.fill(200 * KIB)

    out = disk.path / "run"
    with pytest.raises(LongcptError) as e:
        run(out, tokenizer_dir, callbacks=[FillAfterStep2()], trainer__max_steps=STEPS)
    ckpts = out / "checkpoints"
    msg = str(e.value)
    assert msg.startswith(f"cannot save checkpoint {ckpts / 'step-00000004.ckpt'}: it needs about 1.0 MiB ("), msg
    assert "KiB (" in msg.split("and only ")[1] and "are free in" in msg and "nothing was written" in msg
    assert_nothing_half_written(ckpts, "step-00000002.ckpt")
    disk.free_up()
    assert run(out, tokenizer_dir, trainer__max_steps=STEPS).global_step == STEPS
    assert_same_weights(weights(ckpts / "last"), uninterrupted)


@pytest.mark.subprocess
def test_cli_first_checkpoint_on_a_full_disk(forkserver, disk, tmp_path, tokenizer_dir, data_dir):
    """`longcpt train` itself: exit status 2 and one message, no traceback, nothing left behind."""
    if not disk.real:
        pytest.skip("needs a tmpfs (mount refused or FAULTS_MOCK_DISK=1): the mocked ENOSPC runs in process only")
    out = disk.path / "run"
    disk.fill(400 * KIB)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("trainer:\n  max_steps: 4\n")
    args = tiny_overrides(out, None, {"tokenizer": tokenizer_dir, "train": data_dir / "train",
                                      "val": data_dir / "val"}, data__seq_len=32)
    r = forkserver.run("cli", ["train", recipe, *args], tmp_path / "cli.log")
    log = r.output()
    assert r.returncode == 2, log[-3000:]
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(
        f"longcpt train: error: cannot save checkpoint {out / 'checkpoints' / 'step-00000002.ckpt'}: "
        "it needs about "), log[-2000:]
    assert "No earlier checkpoint exists, so a relaunch starts over; nothing was written." in errors[0]
    assert os.listdir(out / "checkpoints") == []
