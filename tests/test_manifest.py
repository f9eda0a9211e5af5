"""Checkpoint manifests and verification, on files laid out as Lightning and DeepSpeed write them."""

import os

import pytest
import torch

from longcpt.manifest import (
    SELF,
    digest_files,
    list_files,
    manifest_bytes,
    manifest_path,
    read_manifest,
    shares,
    verify,
    write_manifest,
)


def deepspeed_folder(root, ranks=2, stage=3):
    """A DeepSpeed checkpoint folder: `latest`, then per-rank model/optimizer shards (torch zip files)."""
    root.mkdir()
    (root / "latest").write_text("checkpoint")
    tag = root / "checkpoint"
    tag.mkdir()
    for r in range(ranks):
        torch.save({"rank": r, "w": torch.randn(64, 64)}, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        if stage == 3:
            torch.save({"rank": r}, tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
    if stage == 2:
        torch.save({"module": torch.randn(8)}, tag / "mp_rank_00_model_states.pt")
    return root


def with_manifest(path, step=30):
    files = list_files(path)
    write_manifest(path, step, digest_files(path, list(files)))
    return path


def all_ranks(path, world):
    return [p for r in range(world) for p in verify(path, r, world)]


def test_shares_cover_every_file_once_and_balance_bytes():
    sizes = {f"f{i}": s for i, s in enumerate([100, 90, 80, 10, 10, 10, 5])}
    parts = shares(sizes, 3)
    assert sorted(k for p in parts for k in p) == sorted(sizes)
    loads = [sum(sizes[k] for k in p) for p in parts]
    assert max(loads) - min(loads) <= 20
    assert shares(sizes, 3) == parts  # every rank computes the same split


def test_file_checkpoint_manifest_round_trip(tmp_path):
    ckpt = tmp_path / "step-00000030.ckpt"
    torch.save({"w": torch.randn(100)}, ckpt)
    with_manifest(ckpt)
    assert manifest_path(ckpt).name == "step-00000030.ckpt.manifest.json"
    assert set(read_manifest(ckpt)) == {SELF} and manifest_bytes(ckpt) == os.path.getsize(ckpt)
    assert verify(ckpt) == [] and all_ranks(ckpt, 4) == []


def test_deepspeed_folder_missing_a_ranks_shard(tmp_path):
    ckpt = with_manifest(deepspeed_folder(tmp_path / "step-00000030.ckpt"))
    assert all_ranks(ckpt, 2) == []
    (ckpt / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    problems = all_ranks(ckpt, 2)
    assert problems == ["step-00000030.ckpt/checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_rank_reports_only_its_share(tmp_path, world):
    ckpt = with_manifest(deepspeed_folder(tmp_path / "step-00000030.ckpt", ranks=3))
    for f in (ckpt / "checkpoint").iterdir():
        with open(f, "r+b") as fh:
            fh.truncate(10)
    per_rank = [verify(ckpt, r, world) for r in range(world)]
    assert sum(len(p) for p in per_rank) == 6  # each damaged file reported exactly once
    assert all("(truncated)" in p for share in per_rank for p in share)


def test_legacy_deepspeed_folder_gets_a_layout_check(tmp_path):
    zero2 = deepspeed_folder(tmp_path / "a", ranks=3, stage=2)
    assert verify(zero2) == []
    (zero2 / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert verify(zero2) == ["a/checkpoint: the optim shards of rank(s) [1] are missing"]

    zero3 = deepspeed_folder(tmp_path / "b", ranks=2, stage=3)
    (zero3 / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert verify(zero3) == ["b/checkpoint: model shards for ranks [0, 1] but optimizer shards for ranks [0]"]

    (zero3 / "latest").write_text("global_step9")
    assert verify(zero3) == ["b/global_step9: no *.pt files (the tag named by 'latest' is missing)"]


def test_legacy_file_zeroed_block_fails_the_zip_crc(tmp_path):
    ckpt = tmp_path / "old.ckpt"
    torch.save({"w": torch.randn(4096)}, ckpt)
    assert verify(ckpt) == []
    with open(ckpt, "r+b") as f:
        f.seek(8000)
        f.write(bytes(512))
    torch.load(ckpt)  # torch itself reads it without complaint
    assert verify(ckpt) == ["old.ckpt: record old/data/0 fails its CRC-32 check (damaged on disk)"]
