"""Verified atomic checkpoints of a training run (`RunCheckpoints`), and the checkpoint folder's rules.

Checkpoint layout (docs/reference.md, section 4), under `out_dir/checkpoints/`:

    step-00000050.ckpt                  a Lightning checkpoint file, or a DeepSpeed folder of the same name
    step-00000050.ckpt.manifest.json    size and SHA-256 of each of its files (`longcpt.manifest`)
    step-00000100.ckpt (+ manifest)
    step-00000040.ckpt.corrupt          one that failed verification: renamed, never deleted
    last -> step-00000100.ckpt          relative symlink, replaced atomically

Saving (`RunCheckpoints.save`, called by every rank at an optimizer-step boundary):
  1. refuse before writing when the filesystem has less free space than the previous checkpoint
     took, all ranks agreeing;
  2. write under a hidden temporary name in the same folder (`.step-00000100.ckpt.tmp`), so the
     final rename is atomic and nothing goes through the system temp folder, and fsync it;
  3. write the manifest, rename the checkpoint into place, fsync the folder;
  4. only then move `last` and delete the oldest complete checkpoints beyond `keep_last_k`.
A kill at any moment leaves `last` on a whole checkpoint. A write error (full disk, quota) removes
the partial checkpoint and stops every rank with one message naming the path, the bytes needed
and the free space; the previous checkpoint stays `last`. (The official AnchorContext training code
deletes the previous checkpoint before writing the next one, so a failure there loses both.)

Resuming (`RunCheckpoints.setup`, once the process group is up, before Lightning restores
anything): temporary files left by a killed run are removed with a line saying so; the newest
checkpoint that verifies is chosen, every rank checking a share of its files; one that does not is
renamed `*.corrupt` with a line naming the problem; `last` is pointed at the chosen one, which is
what `trainer.fit(ckpt_path=checkpoints/last)` loads. With nothing that verifies, one error names
every checkpoint tried. Checkpoints are only taken at optimizer-step boundaries, so a resumed run
continues with exactly the next micro-batch.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from longcpt.errors import LongcptError
from longcpt.fsio import fsync_dir, fsync_tree
from longcpt.lit.checkpoint_io import CheckpointWriteError, RunCheckpointIO, WriteFailure, free_bytes, human
from longcpt.manifest import (
    SELF,
    SUFFIX,
    digest_files,
    list_files,
    manifest_bytes,
    manifest_path,
    shares,
    verify,
    write_manifest,
)

CHECKPOINT_RE = re.compile(r"^step-(\d+)\.ckpt$")
LAST = "last"
CORRUPT = ".corrupt"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder` as (step, path), oldest first (temporaries excluded)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, or None (whether a run has anything to resume).

    Only complete checkpoints ever carry a `step-*.ckpt` name. Which one a run resumes from is
    decided by `RunCheckpoints` once the ranks can agree: the newest one that verifies.
    """
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _size(path: Path) -> int:
    try:
        return sum(list_files(path).values())
    except OSError:
        return 0


def _point_last(folder: Path, name: str) -> None:
    tmp = folder / f".{LAST}.tmp"
    _remove(tmp)
    os.symlink(name, tmp)  # relative: the run folder can be moved or copied
    os.replace(tmp, folder / LAST)


def _last_target(folder: Path) -> Path | None:
    """The checkpoint `last` points to, when it exists."""
    last = folder / LAST
    return folder / os.readlink(last) if last.is_symlink() and last.exists() else None


def _is_temporary(name: str) -> bool:
    # Ours (.step-*.ckpt.tmp, .last.tmp, .step-*.ckpt.tmp-pruned) and longcpt.fsio's (.NAME.tmp-*,
    # .NAME.old-*: a folder being replaced).
    return name.startswith(".") and (".tmp" in name or ".old-" in name)


def remove_stale(folder: Path) -> list[str]:
    """Remove what a killed run left in a checkpoint folder; returns a description of each.

    Temporaries (hidden `*.tmp*` names: a checkpoint or manifest being written, a `last` being
    replaced, a pruned checkpoint being deleted; `longcpt.fsio`'s temporaries in the run folder)
    and the manifest of a checkpoint killed between its manifest and its rename (that
    checkpoint's temporary is there too). Complete checkpoints and `*.corrupt` ones are never
    touched. Called on rank 0 before training starts, when nothing else writes there.
    """
    removed = []
    entries = sorted(folder.iterdir())
    temporaries = [p.name for p in entries if _is_temporary(p.name)]
    for path in entries:
        name = path.name
        if name.endswith(SUFFIX) and not (folder / name[: -len(SUFFIX)]).exists():
            if any(t.startswith(f".{name[: -len(SUFFIX)]}.tmp") for t in temporaries):
                removed.append(f"{name} (its checkpoint was never renamed into place)")
                _remove(path)
        elif name in temporaries:
            removed.append(f"{name} ({'a link' if path.is_symlink() else human(_size(path), exact=False)})")
            _remove(path)
    return removed


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that failed verification (and its manifest) to `*.corrupt`; never delete."""
    aside, n = path.with_name(path.name + CORRUPT), 1
    while aside.exists() or manifest_path(aside).exists():
        aside, n = path.with_name(f"{path.name}{CORRUPT}-{n}"), n + 1
    if path.exists() or path.is_symlink():
        os.replace(path, aside)
    if manifest_path(path).exists():
        os.replace(manifest_path(path), manifest_path(aside))
    return aside


def _all_gather(obj) -> list:
    """`obj` of every rank, in rank order (a list of one outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RunCheckpoints(Callback):
    """Save every `every_n_steps` optimizer steps and at the end; keep the newest `keep_last_k`;
    on resume, choose the newest checkpoint that verifies (see the module docstring).

    Args:
        folder: `out_dir/checkpoints`.
        every_n_steps: optimizer steps between checkpoints.
        keep_last_k: complete checkpoints kept (the one `last` points to is never removed).
        resume: choose a checkpoint to resume from in `setup` (`trainer.fit` is then given
            `folder/last`).
    """

    def __init__(self, folder: str | os.PathLike, every_n_steps: int, keep_last_k: int, resume: bool = False):
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self.keep_last_k = keep_last_k
        self.resume = resume
        self.resumed_from: Path | None = None
        self.saved_step: int | None = None
        self.just_stepped = False  # did the current micro-batch complete an optimizer step?
        self._seen_step: int | None = None

    # ---- start: stale files, verified resume --------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            for folder in (self.folder, self.folder.parent):  # checkpoints/, then the run folder
                removed = remove_stale(folder)
                if removed:
                    print(f"removed {len(removed)} temporary file(s) left in {folder} by an interrupted run: "
                          + ", ".join(removed), flush=True)
        trainer.strategy.barrier("longcpt.checkpoints.start")
        if self.resume:
            self.resumed_from = self._choose(trainer)

    def _candidates(self) -> list[Path]:
        """Checkpoints to try, newest first: complete ones, and manifests whose checkpoint is gone."""
        steps = {}
        for p in self.folder.iterdir():
            name = p.name[: -len(SUFFIX)] if p.name.endswith(SUFFIX) else p.name
            if m := CHECKPOINT_RE.match(name):
                steps[int(m.group(1))] = self.folder / name
        return [steps[s] for s in sorted(steps, reverse=True)]

    def verify(self, path: Path) -> list[str]:
        """Problems of a checkpoint, found by all ranks together (each checks a share of its files)."""
        rank, world = _rank_world()
        return [p for share in _all_gather(verify(path, rank, world)) for p in share]

    def _choose(self, trainer: pl.Trainer) -> Path | None:
        corrupt_before = sorted(p.name for p in self.folder.iterdir()
                                if CORRUPT in p.name and not p.name.endswith(SUFFIX))
        tried, chosen = [], None
        for path in self._candidates():
            t0 = time.perf_counter()
            problems = self.verify(path)
            if not problems:
                chosen = path
                rank_zero_info(f"verified {path.name}: {human(manifest_bytes(path) or _size(path), exact=False)} "
                               f"in {time.perf_counter() - t0:.1f}s")
                break
            said = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            tried.append(f"{path.name}: {said}")
            if trainer.is_global_zero:
                aside = set_aside(path)
                print(f"skipping checkpoint {path}: {said}. Renamed to {aside.name} (kept for inspection); "
                      "trying the previous one", flush=True)
        trainer.strategy.barrier("longcpt.resume.verified")
        if chosen is None:
            if tried or corrupt_before:
                raise LongcptError(self._nothing_verifies(tried, corrupt_before))
            return None
        if trainer.is_global_zero and _last_target(self.folder) != chosen:
            _point_last(self.folder, chosen.name)
        trainer.strategy.barrier("longcpt.resume.last")
        self._await_last(chosen)
        if trainer.is_global_zero:
            print(f"resuming from {chosen}", flush=True)
        return chosen

    def _nothing_verifies(self, tried: list[str], corrupt_before: list[str]) -> str:
        lines = [f"no checkpoint in {self.folder} can be resumed from:"]
        lines += [f"  - {t} (renamed *{CORRUPT})" for t in tried]
        if corrupt_before:
            lines.append(f"  - set aside earlier after failing verification: {', '.join(corrupt_before)}")
        lines.append("Restore a good checkpoint into that folder, or start over with trainer.resume=false "
                     "(the folder is moved aside, not deleted).")
        return "\n".join(lines)

    def _await_last(self, chosen: Path, seconds: float = 30.0) -> None:
        """Wait until this rank sees `last` -> `chosen` (a network filesystem may show a stale link)."""
        deadline = time.monotonic() + seconds
        while _last_target(self.folder) != chosen:
            if time.monotonic() > deadline:
                rank, _ = _rank_world()
                raise LongcptError(f"rank {rank} still sees {self.folder / LAST} -> {_last_target(self.folder)} "
                                   f"{seconds:.0f}s after rank 0 pointed it to {chosen.name}: the checkpoint "
                                   "folder looks different from different nodes (trainer.out_dir must be on a "
                                   "filesystem all nodes share)")
            time.sleep(0.5)

    # ---- during the run ---------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume the restored step is already on disk.
        self._seen_step = trainer.global_step
        self.saved_step = trainer.global_step if trainer.global_step > 0 else None

    def stepped(self, trainer: pl.Trainer) -> bool:
        """True once per optimizer step, on the micro-batch that completed it."""
        if trainer.global_step == self._seen_step:
            return False
        self._seen_step = trainer.global_step
        return True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.just_stepped = self.stepped(trainer)
        if self.just_stepped and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and self.saved_step != trainer.global_step:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> Path:
        """Write the checkpoint of the current step (all ranks call this) and move `last` to it.

        Raises:
            CheckpointWriteError: on every rank, when it could not be written (full disk, ...).
        """
        step = trainer.global_step
        name = checkpoint_name(step)
        final = self.folder / name
        # A complete checkpoint of this very step is never replaced (a swap would leave a moment
        # with none); runs resume from the newest step, so it holds this same state.
        if trainer.strategy.broadcast(final.exists()):
            rank_zero_warn(f"{final} exists already; keeping it")
        else:
            self._write(trainer, step, final)
        if trainer.is_global_zero:
            _point_last(self.folder, name)
            self._prune(keep=final)
        trainer.strategy.barrier("longcpt.checkpoint.done")
        self.saved_step = step
        return final

    def _write(self, trainer: pl.Trainer, step: int, final: Path) -> None:
        tmp = final.with_name(f".{final.name}.tmp")
        last = _last_target(self.folder)
        needed = manifest_bytes(last) if last is not None else None  # checkpoints keep their size
        free = free_bytes(self.folder)
        self._agree(trainer, WriteFailure(tmp, needed, free) if needed is not None and needed > free else None,
                    final, last)
        if trainer.is_global_zero:
            _remove(tmp)
        trainer.strategy.barrier("longcpt.checkpoint.begin")
        t0 = time.perf_counter()
        io = trainer.strategy.checkpoint_io
        io = io if isinstance(io, RunCheckpointIO) else None
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # collective for DeepSpeed; rank 0 writes for the others
        except OSError as e:
            # Only DeepSpeed, which writes each rank's shard itself, gets here. Its other ranks are
            # inside its save and wait until trainer.timeout_minutes; this rank reports now. The
            # partial folder is removed as a stale temporary when the run is relaunched.
            failure = WriteFailure(tmp, needed, free_bytes(self.folder), _size(tmp), e)
            raise CheckpointWriteError(failure.message(final, last) + f" (rank {_rank_world()[0]})") from None
        self._agree(trainer, io.failure if io is not None else None, final, last)
        if io is not None:
            digests = {SELF: io.written} if trainer.is_global_zero else {}
        else:
            digests = self._digest(tmp)
        failure = None
        if trainer.is_global_zero:
            try:
                _commit(tmp, final, step, digests, fsync=io is None)
            except OSError as e:
                written = sum(d.bytes for d in digests.values())
                for leftover in (manifest_path(final), tmp):
                    _remove(leftover)
                failure = WriteFailure(tmp, needed or written, free_bytes(self.folder), written, e)
        self._agree(trainer, failure, final, last)
        rank_zero_info(f"checkpoint {final} ({time.perf_counter() - t0:.1f}s)")

    def _digest(self, tmp: Path) -> dict:
        """SHA-256 of every file of a checkpoint folder, each rank hashing a share (all ranks call)."""
        rank, world = _rank_world()
        sizes: dict[str, int] = {}
        for seen in _all_gather(list_files(tmp)):  # union: each rank surely sees the files it wrote
            sizes.update(seen)
        mine = digest_files(tmp, shares(sizes, world)[rank])
        return {k: v for part in _all_gather(mine) for k, v in part.items()}

    def _agree(self, trainer: pl.Trainer, failure: WriteFailure | None, final: Path, last: Path | None) -> None:
        """Raise the same `CheckpointWriteError` on every rank when any rank has a failure."""
        messages = [m for m in _all_gather(failure.message(final, last) if failure else None) if m]
        if messages:
            if trainer.is_global_zero:
                _remove(final.with_name(f".{final.name}.tmp"))
            raise CheckpointWriteError(messages[0])

    def _prune(self, keep: Path) -> None:
        complete = [p for _, p in list_checkpoints(self.folder)]
        for path in complete[: max(0, len(complete) - self.keep_last_k)]:
            if path != keep:
                # Manifest first: a kill in between leaves a whole checkpoint without one (load
                # checked), then a hidden name: a kill during the deletion leaves a stale temporary.
                manifest_path(path).unlink(missing_ok=True)
                doomed = path.with_name(f".{path.name}.tmp-pruned")
                os.replace(path, doomed)
                _remove(doomed)


def _commit(tmp: Path, final: Path, step: int, digests: dict, fsync: bool) -> None:
    """Rank 0: make a fully written checkpoint durable, write its manifest, rename it into place."""
    if fsync:
        fsync_tree(tmp)
    write_manifest(final, step, digests)
    os.replace(tmp, final)
    fsync_dir(final.parent)
