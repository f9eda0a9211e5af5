"""The kernel check fails a kernel that leaks across documents (and passes the real one)."""

import torch

from longcpt.doctor.kernels import KindCheckTools
from longcpt.doctor.report import FAIL, PASS
from longcpt.model.attention.document import doctor as document_doctor
from longcpt.model.attention.document import kernels as document


def test_a_leaking_kernel_fails_and_the_real_one_passes(monkeypatch):
    cpu = torch.device("cpu")
    tools = KindCheckTools(cpu, quick=True)
    assert document_doctor.check_backend("sdpa", "bf16", cpu, True, tools).status == PASS

    def whole_row_causal(q, k, v, layout):  # attends across documents: the bug the check exists for
        b, t = layout.batch, layout.seq_len
        rows = [x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v)]
        y = torch.nn.functional.scaled_dot_product_attention(*rows, is_causal=True, enable_gqa=True)
        return y.transpose(1, 2).reshape(b * t, q.shape[1], q.shape[2])

    monkeypatch.setitem(document._KERNELS, "sdpa", whole_row_causal)
    result = document_doctor.check_backend("sdpa", "bf16", cpu, True, tools)
    assert result.status == FAIL and "beyond tolerance" in result.detail
    assert result.data["errors"]["mha"]["out"] > 0.1


def test_a_32_true_recipe_gets_float32_kernel_rows():
    """`32-true` on a GPU trains with FlexAttention in float32 (the 16-bit kernels exclude it):
    float32 rows are checked for such a recipe, and only then."""
    cpu = torch.device("cpu")
    rows = {r.name: r for r in document_doctor.check_kernels(cpu, True, KindCheckTools(cpu, True, precision="32-true"))}
    for name in ("sdpa fp32", "flex fp32"):
        assert rows[name].status == PASS and rows[name].data["tolerance"] == 8 * 2.0**-10
        assert max(rows[name].data["errors"]["gqa"].values()) < 1e-5  # true float32 on the CPU
    mixed = KindCheckTools(cpu, True, precision="bf16-mixed")
    assert not any("fp32" in r.name for r in document_doctor.check_kernels(cpu, True, mixed))
