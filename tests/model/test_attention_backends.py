"""How the document kernels are picked and compiled: paths only a GPU takes, run on CPU.

* flash-attn counts only when its extension loads: an installed wheel built for another torch
  raises ImportError ("undefined symbol") at import, and torch's varlen kernel is used instead.
* FlexAttention is compiled once for every shape: compiled per shape, each new window length
  recompiles until dynamo's recompile limit, after which torch runs it eagerly (dense scores).
* Compiled FlexAttention honours the block mask's block structure; eager FlexAttention evaluates
  `mask_mod` densely and cannot see a wrong `BlockMask`. Inductor compiles the forward on CPU,
  so the CUDA code path is run here with the real compiler.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from longcpt.model.attention.document import available_backends, document_attention, document_layout
from longcpt.model.attention.document import kernels as document

BROKEN_WHEEL = (
    'raise ImportError("/venv/lib/python3.11/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: '
    'undefined symbol: _ZN3c104cuda9SetDeviceEi")\n'
)


@pytest.fixture
def fresh_flash_attn_status(monkeypatch):
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    document.flash_attn_status.cache_clear()
    yield
    document.flash_attn_status.cache_clear()


@pytest.fixture
def ampere(monkeypatch):
    """A CUDA device of compute capability 8.0, as far as backend selection asks."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))


def test_installed_but_broken_flash_attn_falls_back_to_torch_varlen(tmp_path, monkeypatch, fresh_flash_attn_status,
                                                                    ampere):
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text(BROKEN_WHEEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="undefined symbol.*torch's varlen kernel instead"):
        backends = available_backends("cuda", torch.bfloat16)
    assert backends[0] == "varlen" and "flash_attn" not in backends
    status = document.flash_attn_status()
    assert status.installed and not status.usable and "undefined symbol" in status.error
    with warnings.catch_warnings():  # said once per process
        warnings.simplefilter("error")
        assert available_backends("cuda", torch.float16)[0] == "varlen"


def test_flash_attn_that_loads_comes_first(tmp_path, monkeypatch, fresh_flash_attn_status, ampere):
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text(
        '__version__ = "2.8.3"\n\ndef flash_attn_varlen_func(*args, **kwargs):\n    raise NotImplementedError\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert available_backends("cuda", torch.bfloat16)[:2] == ["flash_attn", "varlen"]
    assert document.flash_attn_status().version == "2.8.3"
    assert "flash_attn" not in available_backends("cuda", torch.float32)  # FlashAttention-2: 16-bit only


def dense_reference(q, k, v, cu):
    """Causal attention inside each document, from an explicit (T, T) mask (B = 1)."""
    t = q.shape[2]
    doc = torch.searchsorted(cu[1:].long(), torch.arange(t), right=True)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_attention_compiles_once_for_every_length(monkeypatch):
    """The compiled path (CUDA's) on CPU with a counting backend: three window lengths cost at most
    two compilations each for the kernel and its block mask (torch 2.13: the first shape, then the
    switch to symbolic sizes, reused from then on), where per-shape compilation needs one per
    length (6 in all, measured with dynamic=False)."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    monkeypatch.setattr(document, "_COMPILED_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(document, "_COMPILE_BACKEND", counter)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    lengths = (128, 256, 384)
    for t in lengths:
        cu = torch.tensor([0, t // 2 - 1, t // 2, t], dtype=torch.int32)  # a 1-token document in the middle
        q, k, v = (torch.randn(1, h, t, 16, generator=g) for h in (4, 2, 2))
        out = document_attention(q, k, v, document_layout(cu, 1, t), backend="flex")
        torch.testing.assert_close(out, dense_reference(q, k, v, cu), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    assert counter.frame_count <= 2 * 2 < 2 * len(lengths), counter.frame_count


# Two rows whose documents cross the 128-token blocks differently: in row 0 no token after 128
# sees a token before it, in row 1 the second document spans both blocks. A block mask with
# B=None (one block structure for every row) is built from row 0 and skips row 1's cross-block work.
BLOCK_ROWS_CU = [0, 100, 128, 200, 256, 256 + 40, 256 + 190, 512]


def _compiled_flex_error(q, k, v, cu) -> float:
    with torch.no_grad():  # the CPU flex kernel has no backward (torch 2.13)
        out = document_attention(q, k, v, document_layout(cu, 2, 256), backend="flex")
    return float((out - dense_reference_rows(q, k, v, cu)).abs().max())


def dense_reference_rows(q, k, v, cu):
    """`dense_reference` for every row of a packed batch."""
    t = q.shape[2]
    return torch.cat([dense_reference(q[r:r + 1], k[r:r + 1], v[r:r + 1], cu_row)
                      for r, cu_row in enumerate(_row_boundaries(cu, q.shape[0], t))])


def _row_boundaries(cu, batch, t):
    bounds = cu.tolist()
    return [torch.tensor([b - r * t for b in bounds if r * t <= b <= (r + 1) * t]) for r in range(batch)]


@pytest.mark.slow
def test_compiled_flex_attention_on_cpu_equals_dense_and_sees_the_block_mask(monkeypatch, inductor_cache):
    """longcpt's compiled flex path (CUDA's) with the real inductor on CPU equals the dense
    reference; the same path with a block mask built for B=None must not (the control shows that
    this test sees block structure: eager flex would pass it, off by 1.9e-7)."""
    monkeypatch.setattr(document, "_COMPILED_DEVICES", ("cpu", "cuda"))
    torch._dynamo.reset()
    cu = torch.tensor(BLOCK_ROWS_CU, dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 256, 16, generator=g) for h in (4, 2, 2))
    assert _compiled_flex_error(q, k, v, cu) < 1e-5

    compiled = document._compiled

    def block_mask_for_every_row(name):
        fn = compiled(name)
        if name != "create_block_mask":
            return fn
        return lambda mask_mod, batch, heads, *args, **kwargs: fn(mask_mod, None, heads, *args, **kwargs)

    monkeypatch.setattr(document, "_compiled", block_mask_for_every_row)
    assert _compiled_flex_error(q, k, v, cu) > 0.1
    torch._dynamo.reset()
