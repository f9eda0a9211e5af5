"""`model.fused_kernels`: Liger Kernel's RMSNorm and SwiGLU routed into every block (GPU only).

On a CPU the wiring is checked with stand-ins that have the eager numerics and count their calls;
the real kernels against the eager model run under the `gpu` marker (and in `longcpt doctor`).
"""

import pytest
import torch
from tiny import eager_fused_kernels

from longcpt.config import load_config
from longcpt.errors import ConfigError, LongcptError
from longcpt.model import fused
from longcpt.model.config import ModelArgs
from longcpt.model.llama import CausalLM

ARGS = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attention="anchor")


def test_every_norm_and_mlp_runs_the_fused_kernels_with_the_same_results():
    torch.manual_seed(0)
    eager = CausalLM(ARGS)
    model = CausalLM(ARGS)
    model.load_state_dict(eager.state_dict())
    calls = {"norm": 0, "mlp": 0}
    assert fused.apply_fused_kernels(model, "liger", eager_fused_kernels(calls)) == 3 * ARGS.num_hidden_layers + 1
    ids = torch.randint(0, 64, (2, 24))
    cu = torch.tensor([0, 10, 24, 34, 48], dtype=torch.int32)
    got, expected = model.loss(ids, ids, cu_seqlens=cu), eager.loss(ids, ids, cu_seqlens=cu)
    assert calls == {"norm": 2 * ARGS.num_hidden_layers + 1, "mlp": ARGS.num_hidden_layers}  # one forward
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got.backward()
    expected.backward()
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
    assert fused.apply_fused_kernels(CausalLM(ARGS), "none") == 0


def test_refused_on_a_cpu_and_misspelt_with_the_fix():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.config={model_type: llama}", "model.tokenizer=tok", "model.fused_kernels=liger",
                           "trainer.accelerator=cpu"])
    assert "model.fused_kernels=liger" in str(e.value) and "use model.fused_kernels=none on a CPU" in str(e.value)
    with pytest.raises(ConfigError, match="model.fused_kernels='triton': must be one of none, liger"):
        load_config(None, ["model.config={model_type: llama}", "model.tokenizer=tok", "model.fused_kernels=triton"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_without_a_gpu_building_them_is_an_error_and_doctor_skips():
    with pytest.raises(LongcptError, match="run on CUDA GPUs and there is none here"):
        fused.apply_fused_kernels(CausalLM(ARGS), "liger")
    assert fused.check(torch.device("cpu"))[0] == "SKIP"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_equals_the_eager_model_in_bf16_on_the_gpu():
    pytest.importorskip("liger_kernel")
    status, detail = fused.check(torch.device("cuda"))
    assert status == "PASS", detail
