"""Writing Lightning checkpoint files where they land, and what a failed write tells the user.

`RunCheckpointIO` is the Lightning CheckpointIO plugin of `longcpt train` (single process and
DDP; DeepSpeed writes its folder itself). Lightning's default plugin serialises the whole
checkpoint into memory and then writes it through fsspec, whose local "transaction" writes a file
in the system temp folder and moves it across filesystems at the end: on a cluster node that
folder is small and local, the copy is slow, and a full disk there leaves the file behind. Here
`torch.save` streams straight into the file `RunCheckpoints` names (a hidden temporary name in
the checkpoint folder, renamed into place once complete), computing the SHA-256 of the manifest
(`longcpt.manifest`) from the bytes as they are written, so nothing is read back.

A write error (full disk, quota, I/O error) is not raised from inside Lightning's save: only
rank 0 writes, and raising there would leave the other ranks waiting in the save's barrier. The
plugin removes the partial file and records a `WriteFailure`; `RunCheckpoints` then makes every
rank stop with one message (`WriteFailure.message`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from longcpt.errors import LongcptError
from longcpt.manifest import Digest


class CheckpointWriteError(LongcptError):
    """A checkpoint could not be written; the previous one is still `last`."""


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of `folder`."""
    return shutil.disk_usage(folder).free


def human(n: int | None, exact: bool = True) -> str:
    """`11534336` -> `11.0 MiB (11,534,336 bytes)` (`exact=False`: `11.0 MiB`)."""
    if n is None:
        return "an unknown amount"
    size, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    if unit == "bytes":
        return f"{n:,} bytes"
    return f"{size:.1f} {unit} ({n:,} bytes)" if exact else f"{size:.1f} {unit}"


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors inside a (nested) checkpoint dict: about the size `torch.save` writes."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes() if obj.device.type != "meta" else 0
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


@dataclass
class WriteFailure:
    """Why a checkpoint was not written: an OSError, or too little free space to start.

    Attributes:
        path: the file or folder being written.
        needed: bytes the checkpoint needs (exact for a Lightning file, else the previous
            checkpoint's size or an estimate; None when unknown).
        free: free bytes on that filesystem after the failure.
        written: bytes written before the failure (0 when refused before writing).
        error: the OSError, or None when refused for lack of space.
    """

    path: Path
    needed: int | None
    free: int
    written: int = 0
    error: OSError | None = None

    @property
    def out_of_space(self) -> bool:
        return self.error is None or self.error.errno in (errno.ENOSPC, errno.EDQUOT)

    def message(self, final: Path, last: Path | None) -> str:
        """One message: the path, what went wrong, bytes needed and free, what is still safe, the fix."""
        if self.error is None:
            what = f"it needs about {human(self.needed)} and only {human(self.free)} are free"
        else:
            reason = os.strerror(self.error.errno) if self.error.errno else str(self.error)
            what = (f"{reason} after writing {human(self.written)} of about {human(self.needed)}; "
                    f"{human(self.free)} free")
        kept = (f"The previous checkpoint {last} is still `last`" if last is not None
                else "No earlier checkpoint exists, so a relaunch starts over")
        cleaned = "the partial checkpoint was removed" if self.written or self.error else "nothing was written"
        fix = ("Free space in that filesystem (or lower trainer.keep_last_k, or set trainer.out_dir elsewhere)"
               if self.out_of_space else "Fix the filesystem")
        resume = " and run the same command to resume from it" if last is not None else " and run the same command"
        return f"cannot save checkpoint {final}: {what} in {final.parent}. {kept}; {cleaned}. {fix}{resume}."


class _HashingWriter:
    """File-like sink for `torch.save`: writes everything it is given and hashes it."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):  # a raw write may be short (a filling disk): write the rest
                done += self.f.write(view[done:])
        except OSError as e:
            self.error = e  # torch replaces it by a RuntimeError about the zip position; keep it
            raise
        finally:
            self.sha256.update(view[:done])
            self.bytes += done
        return done

    def flush(self) -> None:
        self.f.flush()


class RunCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: `torch.save` straight into the given path, fsynced and hashed.

    After `save_checkpoint`, `written` holds the file's `Digest` (for the manifest) or `failure`
    the reason it was not written; the caller reads and resets them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.written: Digest | None = None
        self.failure: WriteFailure | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("RunCheckpointIO does not take storage_options")
        path = Path(path)
        self.written, self.failure = None, None
        needed = tensor_bytes(checkpoint)
        if needed > free_bytes(path.parent):
            self.failure = WriteFailure(path, needed, free_bytes(path.parent))
            return
        sink = None
        try:
            with open(path, "wb", buffering=0) as f:
                sink = _HashingWriter(f)
                torch.save(checkpoint, sink)
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            error = sink.error if sink is not None and sink.error is not None else e
            if not isinstance(error, OSError):
                raise
            path.unlink(missing_ok=True)
            self.failure = WriteFailure(path, needed, free_bytes(path.parent), sink.bytes if sink else 0, error)
            return
        self.written = Digest(sink.bytes, sink.sha256.hexdigest())
