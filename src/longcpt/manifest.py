"""Checkpoint manifests: what a complete checkpoint holds, so that a damaged one is recognised.

A checkpoint is a Lightning `.ckpt` file or a DeepSpeed folder (one shard per rank). Once it is
completely written, and before it is renamed into place, its manifest is written next to it:

    checkpoints/step-00000030.ckpt                  the checkpoint (file or folder)
    checkpoints/step-00000030.ckpt.manifest.json    {"format": "longcpt-checkpoint/1",
                                                     "checkpoint": "step-00000030.ckpt", "step": 30,
                                                     "bytes": 11534336,
                                                     "files": {".": {"bytes": 11534336,
                                                                     "sha256": "9f2c..."}}}

`files` maps each file to its size and SHA-256: "." is the checkpoint itself when it is a file;
in a DeepSpeed folder the keys are paths inside it (`latest`, `checkpoint/zero_pp_rank_1_...pt`).
A checkpoint *verifies* when its manifest reads and every listed file exists with that size and
checksum. A truncated copy, a zeroed block (which `torch.load` does not notice: it reads no
checksums) or a rank's missing shard all fail, and the problem names the file.

Checkpoints written before manifests existed get a load check instead: every torch zip file in
them passes the zip CRC-32 check (`zipfile.testzip`, a full read) and a DeepSpeed folder has its
`latest` tag and the shard files of every rank.

The checks are split into shares (`shares`) so that every rank of a multi-process run reads a
part of the checkpoint and each byte is read once; the caller gathers the problems. Nothing here
imports torch: `longcpt export` and the training callbacks use the same functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from longcpt.fsio import atomic_write_json

FORMAT = "longcpt-checkpoint/1"
SUFFIX = ".manifest.json"
SELF = "."  # the key of a checkpoint that is one file
_CHUNK = 8 << 20
# DeepSpeed shard names: `zero_pp_rank_{dp}_mp_rank_{mp}_{model|optim}_states.pt`, and
# `mp_rank_{mp}_model_states.pt` for the unpartitioned module (ZeRO-1/2).
_ZERO_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(model|optim)_states\.pt$")


@dataclass(frozen=True)
class Digest:
    """Size and SHA-256 of one file."""

    bytes: int
    sha256: str


def manifest_path(checkpoint: str | os.PathLike) -> Path:
    """Where the manifest of `checkpoint` lives: next to it, named after it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + SUFFIX)


def sha256_file(path: str | os.PathLike) -> Digest:
    """Size and SHA-256 of a file, read in 8 MiB chunks."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while k := f.readinto(buf):
            h.update(view[:k])
            n += k
    return Digest(n, h.hexdigest())


def list_files(checkpoint: Path) -> dict[str, int]:
    """Every file of a checkpoint as {manifest key: size in bytes} (a file: {".": size})."""
    if checkpoint.is_file():
        return {SELF: checkpoint.stat().st_size}
    return {p.relative_to(checkpoint).as_posix(): p.stat().st_size
            for p in sorted(checkpoint.rglob("*")) if p.is_file()}


def file_path(checkpoint: Path, key: str) -> Path:
    return checkpoint if key == SELF else checkpoint / key


def shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Split files between `world` readers, largest first to the least loaded (deterministic).

    Every rank computes the same split from the same sizes and reads only its own share.
    """
    load, out = [0] * world, [[] for _ in range(world)]
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        r = min(range(world), key=lambda i: (load[i], i))
        out[r].append(key)
        load[r] += sizes[key]
    return out


def digest_files(checkpoint: Path, keys: list[str]) -> dict[str, Digest]:
    """SHA-256 of the given files of a checkpoint (a share of `shares`)."""
    return {key: sha256_file(file_path(checkpoint, key)) for key in keys}


def write_manifest(checkpoint: str | os.PathLike, step: int, files: dict[str, Digest]) -> Path:
    """Write the manifest of the checkpoint that will be named `checkpoint` (atomic, fsynced).

    Written before the checkpoint is renamed to `checkpoint`, so every complete checkpoint has one.
    """
    checkpoint = Path(checkpoint)
    doc = {
        "format": FORMAT,
        "checkpoint": checkpoint.name,
        "step": step,
        "bytes": sum(d.bytes for d in files.values()),
        "files": {k: {"bytes": d.bytes, "sha256": d.sha256} for k, d in sorted(files.items())},
    }
    return atomic_write_json(manifest_path(checkpoint), doc)


class ManifestError(Exception):
    """A manifest that exists but cannot be used (the message says why)."""


def read_manifest(checkpoint: Path) -> dict[str, Digest] | None:
    """The files a checkpoint's manifest lists, or None when it has no manifest.

    Raises:
        ManifestError: the manifest is unreadable, not JSON, or not a longcpt manifest.
    """
    path = manifest_path(checkpoint)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise ManifestError(f"{path.name}: format {doc.get('format')!r}, expected {FORMAT!r}")
        return {k: Digest(int(v["bytes"]), str(v["sha256"])) for k, v in doc["files"].items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(f"{path.name} is unreadable ({type(e).__name__}: {e})") from None


def manifest_bytes(checkpoint: Path) -> int | None:
    """Total size recorded in a checkpoint's manifest (None without a usable manifest)."""
    try:
        files = read_manifest(checkpoint)
    except ManifestError:
        return None
    return sum(d.bytes for d in files.values()) if files else None


def check_files(checkpoint: Path, expected: dict[str, Digest], keys: list[str]) -> list[str]:
    """Problems of the given files against the manifest: missing, wrong size, wrong checksum."""
    problems = []
    for key in keys:
        path, want = file_path(checkpoint, key), expected[key]
        name = checkpoint.name if key == SELF else f"{checkpoint.name}/{key}"
        try:
            size = path.stat().st_size
            if size != want.bytes:
                what = "truncated" if size < want.bytes else "longer than written"
                problems.append(f"{name} has {size:,} bytes, its manifest says {want.bytes:,} ({what})")
            elif sha256_file(path).sha256 != want.sha256:
                problems.append(f"{name}: the content differs from its manifest's SHA-256 (damaged on disk)")
        except FileNotFoundError:
            problems.append(f"{name} is missing")
        except OSError as e:
            problems.append(f"{name} cannot be read ({e.strerror or e})")
    return problems


def load_check_files(checkpoint: Path) -> tuple[dict[str, int], list[str]]:
    """For a checkpoint without a manifest: the files to load-check and the problems of its layout.

    A file checkpoint is one torch zip file. A DeepSpeed folder must name a tag in `latest` whose
    folder holds model-state files and, for ZeRO, one optimizer shard per rank 0..N-1 (a rank
    whose shard is missing leaves a gap, or fewer optimizer than model shards under ZeRO-3).
    """
    if checkpoint.is_file():
        return {SELF: checkpoint.stat().st_size}, []
    latest = checkpoint / "latest"
    if not latest.is_file():
        return {}, [f"{checkpoint.name}: a folder without the DeepSpeed 'latest' file"]
    tag = latest.read_text().strip()
    folder = checkpoint / tag
    files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    if not files:
        return {}, [f"{checkpoint.name}/{tag}: no *.pt files (the tag named by 'latest' is missing)"]
    ranks: dict[str, set[int]] = {"model": set(), "optim": set()}
    for f in files:
        if m := _ZERO_SHARD.search(f.name):
            ranks[m.group(2)].add(int(m.group(1)))
    problems = []
    optim, model = ranks["optim"], ranks["model"]
    if not any(f.name.endswith("model_states.pt") for f in files):
        problems.append(f"{checkpoint.name}/{tag}: no model_states file")
    for kind, found in (("optim", optim), ("model", model)):
        gaps = sorted(set(range(max(found) + 1)) - found) if found else []
        if gaps:
            problems.append(f"{checkpoint.name}/{tag}: the {kind} shards of rank(s) {gaps} are missing")
    if model and optim and model != optim:
        problems.append(f"{checkpoint.name}/{tag}: model shards for ranks {sorted(model)} but optimizer shards "
                        f"for ranks {sorted(optim)}")
    sizes = {f.relative_to(checkpoint).as_posix(): f.stat().st_size for f in files}
    return sizes, problems


def load_check(checkpoint: Path, keys: list[str]) -> list[str]:
    """Problems of the given torch zip files of a checkpoint: unreadable, or a CRC-32 mismatch."""
    problems = []
    for key in keys:
        name = checkpoint.name if key == SELF else f"{checkpoint.name}/{key}"
        try:
            with zipfile.ZipFile(file_path(checkpoint, key)) as z:
                bad = z.testzip()
            if bad is not None:
                problems.append(f"{name}: record {bad} fails its CRC-32 check (damaged on disk)")
        except (zipfile.BadZipFile, EOFError) as e:
            problems.append(f"{name} is not a complete torch checkpoint ({e})")
        except OSError as e:
            problems.append(f"{name} cannot be read ({e.strerror or e})")
    return problems


def verify(checkpoint: Path, rank: int = 0, world: int = 1) -> list[str]:
    """Problems found by rank `rank` of `world` in its share of `checkpoint` ([] = this share is fine).

    With a manifest: size and checksum of every listed file. Without one (an older longcpt wrote
    it): the load check of `load_check_files` and `load_check`. A problem that concerns the whole
    checkpoint (unreadable manifest, broken layout) is reported by rank 0 only.
    """
    try:
        expected = read_manifest(checkpoint)
    except ManifestError as e:
        return [str(e)] if rank == 0 else []
    if not checkpoint.exists():
        return [f"{checkpoint.name} is missing"] if rank == 0 else []
    if expected is not None:
        return check_files(checkpoint, expected, shares({k: d.bytes for k, d in expected.items()}, world)[rank])
    sizes, problems = load_check_files(checkpoint)
    return (problems if rank == 0 else []) + load_check(checkpoint, shares(sizes, world)[rank])
