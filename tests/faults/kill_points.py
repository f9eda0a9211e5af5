"""Kill points inside a checkpoint save, installed in a fork server child (`hooks` of a request).

A save is a sequence of events: the checkpoint file's writes (byte counts), `os.fsync`,
`os.replace` (the checkpoint's, its manifest's, `last`'s, a pruned checkpoint's rename),
`os.symlink` (`last`), `os.unlink` and `shutil.rmtree` (temporaries, pruning). Wrappers count the
events of each `RunCheckpoints.save` and

* `{"record": PATH}`: append every event of every save to PATH as JSON lines
  `{"step", "index", "kind", "detail", "bytes"}` (writes also carry the file offset they start at);
* `{"kill": {"step": S, "index": I, "bytes": B}}`: SIGKILL the process at event I of the save of
  step S, before it happens; for a write, after its first B bytes reached the file.

Nothing outside a save is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

from longcpt.lit import checkpoint_io, checkpoints

_state = {"step": None, "index": 0, "offset": 0}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(hooks: dict) -> None:
    record, kill = hooks.get("record"), hooks.get("kill")

    def event(kind: str, detail: str, nbytes: int = 0) -> int | None:
        """Count an event; returns how many bytes of a write may go through before dying (or None)."""
        step = _state["step"]
        if step is None:
            return None
        index = _state["index"]
        _state["index"] += 1
        if record:
            with open(record, "a") as f:
                f.write(json.dumps({"step": step, "index": index, "kind": kind, "detail": detail,
                                    "bytes": nbytes, "offset": _state["offset"]}) + "\n")
        if kill and kill["step"] == step and kill["index"] == index:
            if kind == "write":
                return int(kill["bytes"])
            _die()
        return None

    save = checkpoints.RunCheckpoints.save

    def counted_save(self, trainer):
        _state.update(step=trainer.global_step, index=0, offset=0)
        try:
            return save(self, trainer)
        finally:
            _state["step"] = None

    checkpoints.RunCheckpoints.save = counted_save

    write = checkpoint_io._HashingWriter.write

    def counted_write(self, data):
        view = memoryview(data).cast("B")
        allowed = event("write", "checkpoint file", len(view))
        if allowed is not None:
            if allowed:
                write(self, view[:allowed])
            self.f.flush()
            _die()
        _state["offset"] += len(view)
        return write(self, data)

    checkpoint_io._HashingWriter.write = counted_write

    def wrap(module, name: str, describe):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            event(name, describe(*args))
            return original(*args, **kwargs)

        setattr(module, name, wrapped)

    base = os.path.basename
    wrap(os, "fsync", lambda fd: os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])
    wrap(os, "replace", lambda src, dst: f"{base(str(src))} -> {base(str(dst))}")
    wrap(os, "symlink", lambda src, dst, *a: f"{base(str(dst))} -> {src}")
    wrap(os, "unlink", lambda path, *a: base(str(path)))
    wrap(shutil, "rmtree", lambda path, *a: base(str(path)))
