"""Two CPU processes on real prepared data: DDP, DeepSpeed ZeRO-2 and ZeRO-3 (gloo) train, save,
resume and export.

The DDP run is a user's `longcpt train` with trainer.devices=2 (Lightning's launcher starts the
second rank); the others start both ranks together as fork server children, as srun does.

The reference is the DDP run: the same seed, data and AdamW give the same weights under ZeRO-2 and
ZeRO-3 (consolidated with DeepSpeed's own zero_to_fp32, no GPU), and every exported folder loads in
plain transformers with the logits of the DDP weights loaded into transformers' own Llama.
"""

import shutil

import pytest
import torch
from lit_helpers import run_train, tiny_overrides, train_ok
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from longcpt.export.convert import read_checkpoint

pytestmark = pytest.mark.slow


def overrides(out, corpus, steps, **extra):
    # Constant LR after warmup, so a run stopped at step 2 and resumed follows the same schedule.
    return tiny_overrides(out, None, corpus, trainer__devices=2, trainer__max_steps=steps,
                          optim__min_lr_ratio=1.0, trainer__export_hf="true", **extra)


def launch(forkserver, out, corpus, steps, **extra) -> str:
    """Both ranks of a run as fork server children; rank 0's output."""
    return train_ok(forkserver, overrides(out, corpus, steps, **extra), out.with_name(f"{out.name}-rank"), world=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, forkserver):
    root = tmp_path_factory.mktemp("dist")
    ddp = run_train(overrides(root / "ddp", corpus, 4, strategy__name="ddp"))
    assert ddp.returncode == 0, ddp.stdout[-4000:] + ddp.stderr[-4000:]
    launch(forkserver, root / "zero2", corpus, 4, strategy__name="deepspeed", strategy__stage=2)
    launch(forkserver, root / "zero3", corpus, 2, strategy__name="deepspeed", strategy__stage=3)
    resumed = launch(forkserver, root / "zero3", corpus, 4, strategy__name="deepspeed", strategy__stage=3)
    assert "resuming from" in resumed and "step-00000002.ckpt" in resumed
    (root / "zero3.log").write_text(resumed)
    return root


def test_zero3_steps_log_no_torch_deprecation_warnings(runs):
    """torch 2.13 deprecates the collectives ZeRO-3 calls every step; the warnings came back at
    every step (245 lines in a 60-step 2-rank job log) and are silenced for the run."""
    log = (runs / "zero3.log").read_text()
    assert "step-00000004.ckpt" in log  # the log of the run that trained
    assert "FutureWarning" not in log, [line for line in log.splitlines() if "FutureWarning" in line][:4]


def test_cpu_ranks_skip_deepspeeds_shared_memory_kernel(runs):
    """DeepSpeed builds its shared-memory all-reduce kernel with gcc when its process group starts
    (about 40 s on a machine's first run); training never uses it (`skip_shm_all_reduce`)."""
    log = (runs / "zero3.log").read_text()
    assert "step-00000004.ckpt" in log and "shm_comm" not in log


def test_checkpoint_formats(runs):
    assert (runs / "ddp" / "checkpoints" / "step-00000004.ckpt").is_file()
    for name in ("zero2", "zero3"):
        ds = runs / name / "checkpoints" / "step-00000004.ckpt"
        assert (ds / "latest").read_text().strip() == "checkpoint"
        assert len(list((ds / "checkpoint").glob("*optim_states.pt"))) == 2  # one shard per rank


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_weights_equal_ddp(runs, name):
    ref, meta = read_checkpoint(runs / "ddp")
    got, _ = read_checkpoint(runs / name)
    assert ref.keys() == got.keys()
    # Four AdamW steps at lr 3e-3 move weights by about 1e-2; reduce-scatter (ZeRO-3) and
    # all-reduce (DDP) sum gradients in different orders, which leaves float32 noise of a few 1e-6
    # (4.4e-6 with DeepSpeed 0.19.8). A wrong update would differ by the size of a step (~1e-3).
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=2e-5, msg=k)
    assert meta["model_args"]["hidden_size"] == 64


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_export_loads_in_transformers_with_ddp_logits(runs, name):
    ref_state, meta = read_checkpoint(runs / "ddp")
    hf = meta["model_args"]["hf_config"]
    reference = LlamaForCausalLM(LlamaConfig(**hf))
    reference.load_state_dict(ref_state, strict=True)
    exported = AutoModelForCausalLM.from_pretrained(runs / name / "hf")
    ids = torch.randint(3, 96, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_zero3_resume_skips_a_folder_missing_a_ranks_shard(runs, corpus, tmp_path, forkserver):
    """A DeepSpeed checkpoint whose rank-1 optimizer shard is gone: the two ranks verify it together,
    it is set aside (not deleted), and the run resumes from the previous one to the same weights."""
    out = tmp_path / "zero3"
    shutil.copytree(runs / "zero3", out, symlinks=True)
    ckpts = out / "checkpoints"
    expected, _ = read_checkpoint(ckpts / "step-00000004.ckpt")
    (ckpts / "step-00000004.ckpt" / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    result = launch(forkserver, out, corpus, 4, strategy__name="deepspeed", strategy__stage=3)
    assert (f"skipping checkpoint {ckpts / 'step-00000004.ckpt'}: step-00000004.ckpt/checkpoint/"
            "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing") in result
    assert f"resuming from {ckpts / 'step-00000002.ckpt'}" in result
    assert (ckpts / "step-00000004.ckpt.corrupt" / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    got, _ = read_checkpoint(ckpts / "last")
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k
