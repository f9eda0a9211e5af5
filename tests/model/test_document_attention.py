"""`intra_doc` and `anchor` against references that are not our code.

References:
  * transformers' own `*ForCausalLM` run on one document at a time, with the positions docs/reference.md
    section 6 gives that document (anchor: `[0, s+1, ..., s+len-1]`; intra_doc: `arange(len)`);
  * a dense (T, T) document mask fed to SDPA (defined here, test-only) for gradients and for random
    layouts.
Inputs (cu_seqlens, position ids) are built here from the reference's text (docs/reference.md, section 3) directly, in a few lines, so
these tests also cross-check the collator of `longcpt.data`.
"""

from __future__ import annotations

import random
import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import longcpt
from longcpt.errors import LongcptError
from longcpt.model import CausalLM, ModelArgs
from longcpt.model.attention import KINDS, KindSpec
from longcpt.model.attention.document import (
    available_backends,
    document_attention,
    document_layout,
)
from longcpt.model.attention.document import sdpa as document_sdpa

BOS = 1
VOCAB = 97


# ---------------------------------------------------------------------------------------------
# Inputs from the reference's text (docs/reference.md, section 3)


def random_window(rng: random.Random, batch: int, seq_len: int, max_doc: int) -> list[list[int]]:
    """Document lengths per row, summing to seq_len; 1-token documents included."""
    rows = []
    for _ in range(batch):
        lens, left = [], seq_len
        while left:
            n = min(left, rng.choice([1, 2, rng.randint(3, max_doc)]))
            lens.append(n)
            left -= n
        rows.append(lens)
    return rows


def pack(rows: list[list[int]], seq_len: int, seed: int = 0):
    """input_ids (each document starts with BOS), cu_seqlens and the two kinds' positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(rows), seq_len), generator=g)
    starts, anchor, intra = [], [], []
    for r, lens in enumerate(rows):
        s = 0
        a_pos, i_pos = list(range(seq_len)), []
        for n in lens:
            ids[r, s] = BOS
            starts.append(r * seq_len + s)
            a_pos[s] = 0  # each document's BOS is its anchor, at position 0
            i_pos += list(range(n))  # intra_doc restarts at 0
            s += n
        anchor.append(a_pos)
        intra.append(i_pos)
    cu = torch.tensor(starts + [len(rows) * seq_len], dtype=torch.int32)
    return ids, cu, torch.tensor(anchor), torch.tensor(intra)


def documents(rows: list[list[int]]):
    """(row, start, length) of every document."""
    for r, lens in enumerate(rows):
        s = 0
        for n in lens:
            yield r, s, n
            s += n


# ---------------------------------------------------------------------------------------------
# Tiny models written by transformers itself


def hf_model(family: str, tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        bos_token_id=BOS,
        eos_token_id=2,
        # Sharper than the default 0.02 so that attention is far from uniform and leaks show.
        initializer_range=0.2,
    )
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common, use_sliding_window=False), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM
    model = cls(cfg).eval()
    path = tmp_path / family
    model.save_pretrained(path)
    return model, path


def hf_logits(model, ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
    # An explicit all-ones attention_mask: without it transformers infers "packed sequences" from
    # position ids that do not step by 1 (masking_utils.find_packed_sequence_indices) and would cut
    # the anchor off its document (a pitfall of the official AnchorContext code: it must not be done).
    with torch.no_grad():
        return model(
            input_ids=ids[None],
            position_ids=torch.tensor([positions]),
            attention_mask=torch.ones(1, len(positions), dtype=torch.long),
        ).logits[0]


# ---------------------------------------------------------------------------------------------
# Equivalence with single-document runs of transformers


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_anchor_equals_single_document_runs_of_transformers(family, tmp_path):
    hf, path = hf_model(family, tmp_path)
    ours = longcpt.from_pretrained(path, attention="anchor").eval()
    rows = random_window(random.Random(1), batch=2, seq_len=80, max_doc=30)
    ids, cu, anchor_pos, _ = pack(rows, 80)
    with torch.no_grad():
        logits = ours(ids, position_ids=anchor_pos, cu_seqlens=cu)
    for r, s, n in documents(rows):
        ref = hf_logits(hf, ids[r, s : s + n], [0] + list(range(s + 1, s + n)))
        torch.testing.assert_close(logits[r, s : s + n], ref, atol=2e-5, rtol=1e-5)


def test_intra_doc_equals_each_document_alone(tmp_path):
    hf, path = hf_model("mistral", tmp_path)
    ours = longcpt.from_pretrained(path, attention="intra_doc").eval()
    rows = random_window(random.Random(2), batch=2, seq_len=72, max_doc=40)
    ids, cu, _, intra_pos = pack(rows, 72)
    with torch.no_grad():
        logits = ours(ids, position_ids=intra_pos, cu_seqlens=cu)
    for r, s, n in documents(rows):
        ref = hf_logits(hf, ids[r, s : s + n], list(range(n)))
        torch.testing.assert_close(logits[r, s : s + n], ref, atol=2e-5, rtol=1e-5)


def test_full_attention_does_not_pass_the_same_checks(tmp_path):
    """The checks above can fail: `full` on the same packed window attends across documents."""
    hf, path = hf_model("llama", tmp_path)
    ours = longcpt.from_pretrained(path, attention="full").eval()
    rows = [[20, 25, 19]]
    ids, cu, anchor_pos, _ = pack(rows, 64)
    with torch.no_grad():
        logits = ours(ids, position_ids=anchor_pos, cu_seqlens=cu)
    r, s, n = list(documents(rows))[1]
    ref = hf_logits(hf, ids[r, s : s + n], [0] + list(range(s + 1, s + n)))
    assert (logits[r, s : s + n] - ref).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["anchor", "intra_doc"])
def test_one_document_window_equals_full(kind, tmp_path):
    _, path = hf_model("llama", tmp_path)
    full = longcpt.from_pretrained(path, attention="full").eval()
    ours = longcpt.from_pretrained(path, attention=kind).eval()
    ids, cu, anchor_pos, intra_pos = pack([[48], [48]], 48)
    pos = anchor_pos if kind == "anchor" else intra_pos  # both arange(48) for one document
    with torch.no_grad():
        assert torch.equal(ours(ids, position_ids=pos, cu_seqlens=cu), full(ids))
        assert torch.equal(ours(ids), full(ids))  # no cu_seqlens: one document per row


def test_positions_default_to_the_kinds_spec_positions(tmp_path):
    _, path = hf_model("llama", tmp_path)
    rows = random_window(random.Random(3), batch=2, seq_len=40, max_doc=15)
    ids, cu, anchor_pos, intra_pos = pack(rows, 40)
    for kind, pos in (("anchor", anchor_pos), ("intra_doc", intra_pos)):
        model = longcpt.from_pretrained(path, attention=kind).eval()
        with torch.no_grad():
            assert torch.equal(model(ids, cu_seqlens=cu), model(ids, position_ids=pos, cu_seqlens=cu))


@pytest.mark.parametrize("kind", ["anchor", "intra_doc"])
def test_collator_batches_give_single_document_results(kind, tmp_path):
    """End to end with longcpt.data: pack_documents + the collator's positions and cu_seqlens."""
    from longcpt.data import pack_documents
    from longcpt.data.collate import Collator

    hf, path = hf_model("llama", tmp_path)
    model = longcpt.from_pretrained(path, attention=kind).eval()
    rng = random.Random(11)
    docs = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(8)]
    windows = list(pack_documents(docs, 48, bos_id=BOS, eos_id=2, pad_id=0))[:2]
    batch = Collator(kind)(windows)
    rows = [list(w["doc_lens"]) for w in windows]
    _, cu, anchor_pos, intra_pos = pack(rows, 48)  # the reference's text, independently
    assert torch.equal(batch["cu_seqlens"], cu)
    assert torch.equal(batch["position_ids"], anchor_pos if kind == "anchor" else intra_pos)
    ids = batch["input_ids"]
    with torch.no_grad():
        logits = model(ids, position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
    for r, s, n in documents(rows):
        pos = [0] + list(range(s + 1, s + n)) if kind == "anchor" else list(range(n))
        torch.testing.assert_close(
            logits[r, s : s + n], hf_logits(hf, ids[r, s : s + n], pos), atol=2e-5, rtol=1e-5
        )


# ---------------------------------------------------------------------------------------------
# No leakage between documents


def test_changing_one_document_never_changes_another(tmp_path):
    _, path = hf_model("llama", tmp_path)
    model = longcpt.from_pretrained(path, attention="anchor").eval()
    rows = [[17, 1, 30, 16], [33, 31]]
    ids, cu, pos, _ = pack(rows, 64)
    docs = list(documents(rows))
    with torch.no_grad():
        before = model(ids, position_ids=pos, cu_seqlens=cu)
        for j, (r, s, n) in enumerate(docs):
            changed = ids.clone()
            changed[r, s + 1 : s + n] = torch.randint(3, VOCAB, (n - 1,))
            changed[r, s] = 5 if n == 1 else BOS  # a one-token document changes its only token
            after = model(changed, position_ids=pos, cu_seqlens=cu)
            for i, (r2, s2, n2) in enumerate(docs):
                same = torch.equal(after[r2, s2 : s2 + n2], before[r2, s2 : s2 + n2])
                assert same == (i != j), f"document {i} {'changed' if i != j else 'did not change'} with {j}"


def test_no_gradient_flows_between_documents(tmp_path):
    _, path = hf_model("llama", tmp_path)
    model = longcpt.from_pretrained(path, attention="anchor")
    rows = [[25, 14, 25]]
    ids, cu, pos, _ = pack(rows, 64)
    seen = {}

    def keep(module, inputs, output):
        output.retain_grad()
        seen["emb"] = output

    model.model.embed_tokens.register_forward_hook(keep)
    logits = model(ids, position_ids=pos, cu_seqlens=cu)
    logits[0, 25:39].pow(2).sum().backward()  # loss on the middle document only
    grad = seen["emb"].grad[0].abs().sum(-1)  # (T,)
    assert grad[:25].eq(0).all() and grad[39:].eq(0).all()
    assert grad[25:39].gt(0).all()


def test_splitting_a_document_changes_only_that_document(tmp_path):
    _, path = hf_model("llama", tmp_path)
    model = longcpt.from_pretrained(path, attention="intra_doc").eval()
    a = [[10, 24, 30]]
    b = [[10, 12, 12, 30]]  # the middle document becomes two; the bucket plan changes too
    ids, cu_a, _, pos_a = pack(a, 64)
    _, cu_b, _, pos_b = pack(b, 64)
    ids_b = ids.clone()
    ids_b[0, 22] = BOS
    with torch.no_grad():
        out_a = model(ids, position_ids=pos_a, cu_seqlens=cu_a)
        out_b = model(ids_b, position_ids=pos_b, cu_seqlens=cu_b)
    torch.testing.assert_close(out_a[0, :10], out_b[0, :10], atol=1e-6, rtol=0)
    torch.testing.assert_close(out_a[0, 34:], out_b[0, 34:], atol=1e-6, rtol=0)
    assert not torch.allclose(out_a[0, 22:34], out_b[0, 22:34], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Against a dense-mask reference (test-only)


def dense_document_attention(q, k, v, cu_seqlens):
    """Reference: SDPA with an explicit (B, 1, T, T) boolean `causal & same document` mask."""
    b, hq, t, _ = q.shape
    doc = torch.zeros(b * t, dtype=torch.long)
    doc[cu_seqlens[1:-1].long()] = 1
    doc = doc.cumsum(0).view(b, t)
    mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])


class DenseDocumentReference(torch.nn.Module):
    def __init__(self, args, layer_idx):
        super().__init__()

    def forward(self, q, k, v, ctx):
        q, k = ctx.rotate(q, k)
        return dense_document_attention(q, k, v, ctx.cu_seqlens)


def test_model_gradients_equal_the_dense_reference(monkeypatch):
    reference = KindSpec("_dense_document_reference", DenseDocumentReference, positions="anchor")
    monkeypatch.setitem(KINDS, reference.name, reference)
    torch.manual_seed(0)
    args = ModelArgs(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attention="anchor",
        initializer_range=0.2,
    )
    ours = CausalLM(args)
    args_ref = ModelArgs(**{**args.__dict__, "attention": "_dense_document_reference"})
    ref = CausalLM(args_ref)
    ref.load_state_dict(ours.state_dict())
    rows = random_window(random.Random(4), batch=2, seq_len=64, max_doc=24)
    ids, cu, pos, _ = pack(rows, 64)
    labels = torch.roll(ids, -1, 1)
    for model in (ours, ref):
        model.loss(ids, labels, position_ids=pos, cu_seqlens=cu).backward()
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


@settings(max_examples=30, deadline=None)
@given(
    lens=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=6), min_size=1, max_size=3),
    gqa=st.sampled_from([1, 2]),
)
def test_kernel_and_gradients_equal_dense_reference_for_random_layouts(lens, gqa):
    """float64, so any difference beyond rounding is a bug (a leak, a lost token, a bad pad)."""
    t = max(sum(row) for row in lens)
    rows = [row[:-1] + [row[-1] + t - sum(row)] for row in lens]  # fill every row to T
    _, cu, _, _ = pack(rows, t)
    g = torch.Generator().manual_seed(sum(map(sum, rows)))
    b, hq, d = len(rows), 4, 8
    q = torch.randn(b, hq, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(b, hq // gqa, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(b, hq // gqa, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(b, hq, t, d, dtype=torch.float64, generator=g)
    layout = document_layout(cu, b, t)
    out = document_attention(q, k, v, layout, backend="sdpa")
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = dense_document_attention(q, k, v, cu)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


def assert_bf16_equals_dense_reference(window_seed: int, input_seed: int, max_doc: int) -> None:
    """bf16 document attention (GQA 4:2) on a random packed window against the float32 dense
    reference, forward and backward."""
    rows = random_window(random.Random(window_seed), batch=2, seq_len=96, max_doc=max_doc)
    _, cu, _, _ = pack(rows, 96)
    g = torch.Generator().manual_seed(input_seed)
    xs = [torch.randn(2, h, 96, 16, generator=g).to(torch.bfloat16).requires_grad_() for h in (4, 2, 2)]
    out = document_attention(*xs, document_layout(cu, 2, 96))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    ref_in = [x.detach().float().requires_grad_() for x in xs]
    ref = dense_document_attention(*ref_in, cu)
    ref.sum().backward()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for x, r in zip(xs, ref_in):
        torch.testing.assert_close(x.grad.float(), r.grad, atol=5e-2, rtol=5e-2)


def test_bf16_on_cpu_equals_dense_reference():
    assert_bf16_equals_dense_reference(10, 3, max_doc=40)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_path_equals_dense_reference_on_cpu():
    """FlexAttention (eager on CPU, forward only) with the same document mask."""
    rows = random_window(random.Random(5), batch=2, seq_len=128, max_doc=50)
    _, cu, _, _ = pack(rows, 128)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 128, 16, generator=g) for h in (4, 2, 2))
    layout = document_layout(cu, 2, 128)
    torch.testing.assert_close(
        document_attention(q, k, v, layout, backend="flex"),
        dense_document_attention(q, k, v, cu),
        atol=1e-5,
        rtol=1e-5,
    )


# ---------------------------------------------------------------------------------------------
# The CPU kernel's document chunks (longcpt.model.attention.document.sdpa)


@settings(max_examples=30, deadline=None)
@given(
    lens=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=6), min_size=1, max_size=3),
    gqa=st.sampled_from([1, 2]),
    chunk=st.integers(2, 9),
    ratio=st.sampled_from([1, 2, 100]),
    chunked_up_to=st.sampled_from([20, 2048]),
    native_gqa=st.booleans(),
)
def test_chunked_kernel_and_gradients_equal_dense_reference(lens, gqa, chunk, ratio, chunked_up_to, native_gqa):
    """Documents cut into chunks of a few tokens (64 in use: these lengths would stay whole), alone
    (read in place) or bucketed with others up to 1, 2 or 100 times shorter (gathered and padded),
    those over 20 tokens in one causal call or chunked, with the KV heads given to torch's kernel as
    they are or repeated for it; float64, so any difference beyond rounding is a bug (a wrong chunk
    mask, a lost key gradient, a bad pad)."""
    t = max(sum(row) for row in lens)
    rows = [row[:-1] + [row[-1] + t - sum(row)] for row in lens]
    _, cu, _, _ = pack(rows, t)
    g = torch.Generator().manual_seed(sum(map(sum, rows)) + chunk)
    b, hq, d = len(rows), 4, 8
    q = torch.randn(b, hq, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(b, hq // gqa, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(b, hq // gqa, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(b, hq, t, d, dtype=torch.float64, generator=g)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(document_sdpa, "CHUNK", chunk)
        patch.setattr(document_sdpa, "_MAX_LENGTH_RATIO", ratio)
        patch.setattr(document_sdpa, "CHUNKED_UP_TO", chunked_up_to)
        patch.setattr(document_sdpa, "_native_gqa", lambda: native_gqa)
        out = document_attention(q, k, v, document_layout(cu, b, t), backend="sdpa")
        grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = dense_document_attention(q, k, v, cu)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


def test_chunked_bf16_equals_dense_reference(monkeypatch):
    monkeypatch.setattr(document_sdpa, "CHUNK", 8)
    assert_bf16_equals_dense_reference(11, 4, max_doc=60)


def test_kernel_computes_about_half_of_each_document_square(monkeypatch):
    """torch's CPU kernel computes whole 512-key tiles under `is_causal`, so a 500-token document in
    one call costs 500^2 score entries; chunked, it costs close to its triangle (500^2 / 2). Counted
    over the forward and backward calls the kernel receives."""
    entries = {"forward": 0, "backward": 0}

    def counting(real, name, first):  # q, k are the arguments `first` and `first + 1`
        def call(*args, **kwargs):
            q, k = args[first], args[first + 1]
            entries[name] += q.shape[0] * q.shape[2] * k.shape[2]  # documents x queries x keys
            return real(*args, **kwargs)

        return call

    document_sdpa._native_gqa()  # its probe is not part of the count
    monkeypatch.setattr(document_sdpa, "_FLASH", counting(document_sdpa._FLASH, "forward", 0))
    monkeypatch.setattr(document_sdpa, "_FLASH_BACKWARD", counting(document_sdpa._FLASH_BACKWARD, "backward", 1))
    cu = torch.tensor([0, 500, 512], dtype=torch.int32)
    q, k, v = (torch.randn(1, h, 512, 8, requires_grad=True) for h in (2, 1, 1))
    document_attention(q, k, v, document_layout(cu, 1, 512)).sum().backward()
    assert entries["forward"] == entries["backward"]
    per_pass = entries["forward"]
    assert 500 * 500 / 2 < per_pass < 0.62 * 500 * 500, per_pass


# ---------------------------------------------------------------------------------------------
# Bad input and export


@pytest.mark.parametrize(
    "cu, problem",
    [
        ([0, 10, 40], "end at B*T=64"),
        ([0, 10, 10, 64], "strictly increasing"),
        ([0, 20, 40, 64], "cross row boundaries"),
        ([1, 32, 64], "start at 0"),
    ],
)
def test_bad_cu_seqlens_are_named(cu, problem):
    with pytest.raises(LongcptError, match=re.escape(problem)):
        document_layout(torch.tensor(cu, dtype=torch.int32), 2, 32)


def test_unusable_backend_is_refused():
    q = torch.randn(1, 2, 8, 4)
    layout = document_layout(torch.tensor([0, 3, 8], dtype=torch.int32), 1, 8)
    with pytest.raises(LongcptError, match="varlen"):
        document_attention(q, q, q, layout, backend="varlen")


def test_anchor_model_exports_as_the_plain_source_architecture(tmp_path):
    hf, path = hf_model("llama", tmp_path)
    ours = longcpt.from_pretrained(path, attention="anchor").eval()
    out = longcpt.save_pretrained(ours, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is transformers.LlamaForCausalLM
    assert set(back.state_dict()) == set(hf.state_dict())
    ids, cu, pos, _ = pack([[30, 34]], 64)
    with torch.no_grad():
        logits = ours(ids, position_ids=pos, cu_seqlens=cu)
    ref = hf_logits(back, ids[0, 30:], [0] + list(range(31, 64)))
    torch.testing.assert_close(logits[0, 30:], ref, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# CUDA kernels (skipped without a GPU)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_backends_equal_dense_reference(dtype):
    rows = random_window(random.Random(6), batch=2, seq_len=256, max_doc=100)
    _, cu, _, _ = pack(rows, 256)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(2, h, 256, 64, generator=g) for h in (8, 4, 4)]
    ref_in = [x.double().requires_grad_() for x in base]
    ref = dense_document_attention(*ref_in, cu)
    ref.sum().backward()
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    layout = document_layout(cu.cuda(), 2, 256, "cuda")
    for backend in available_backends("cuda", dtype):
        xs = [x.to("cuda", dtype).requires_grad_() for x in base]
        out = document_attention(*xs, layout, backend=backend)
        out.sum().backward()
        torch.testing.assert_close(out.double().cpu(), ref.detach(), **tol, msg=backend)
        for x, r in zip(xs, ref_in):
            torch.testing.assert_close(x.grad.double().cpu(), r.grad, **tol, msg=backend)


@pytest.mark.gpu
@gpu
def test_cuda_anchor_model_matches_cpu(tmp_path):
    _, path = hf_model("llama", tmp_path)
    cpu = longcpt.from_pretrained(path, attention="anchor").eval()
    cuda = longcpt.from_pretrained(path, attention="anchor", dtype=torch.bfloat16).cuda().eval()
    rows = random_window(random.Random(7), batch=2, seq_len=128, max_doc=60)
    ids, cu, pos, _ = pack(rows, 128)
    with torch.no_grad():
        ref = cpu(ids, position_ids=pos, cu_seqlens=cu)
        out = cuda(ids.cuda(), position_ids=pos.cuda(), cu_seqlens=cu.cuda())
    torch.testing.assert_close(out.float().cpu(), ref, atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels' plumbing, on CPU. torch's varlen runs through its real wrapper and autograd
# with CPU kernels registered for its custom ops; flash-attn through a double with its exact
# signature (tests/model/varlen_doubles.py). bf16 as on the GPU, two rows with 1-token documents.
# The kernels themselves are checked by the GPU tests above.

KV_HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


@pytest.fixture
def cuda_backends_on_cpu(monkeypatch):
    """`document_attention` may pick the CUDA-only backends for CPU tensors (their kernels are doubles)."""
    from longcpt.model.attention.document import kernels as document

    monkeypatch.setattr(document, "available_backends", lambda device, dtype: ["flash_attn", "varlen", "flex", "sdpa"])


def _bf16_fwd_bwd_matches_dense(backend: str, kv_heads: int, seed: int) -> None:
    """`document_attention(backend=...)` in bf16 on two rows: output and dq/dk/dv within bf16
    rounding of a float64 dense reference (max error / max value <= 1e-2; measured 1.5e-3 to
    3.4e-3; a leaking or non-causal mask is off by ~1)."""
    rows = [[85, 1, 64, 106], [44, 1, 211]]  # B=2, T=256
    _, cu, _, _ = pack(rows, 256)
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(2, h, 256, 16, generator=g).to(torch.bfloat16) for h in (4, kv_heads, kv_heads)]
    w = torch.randn(2, 4, 256, 16, generator=g)
    ref_in = [x.double().requires_grad_() for x in base]
    ref = dense_document_attention(*ref_in, cu)
    (ref * w.double()).sum().backward()
    xs = [x.clone().requires_grad_() for x in base]
    out = document_attention(*xs, document_layout(cu, 2, 256), backend=backend)
    (out.float() * w).sum().backward()
    assert out.dtype == torch.bfloat16 and all(x.grad.dtype == torch.bfloat16 for x in xs)

    def rel(a, r):
        return float((a.double() - r).abs().max() / r.abs().max())

    errors = {"out": rel(out.detach(), ref.detach())} | {
        f"d{name}": rel(x.grad, r.grad) for name, x, r in zip("qkv", xs, ref_in)
    }
    assert max(errors.values()) < 1e-2, errors


@pytest.mark.parametrize("heads", KV_HEADS)
def test_torch_varlen_runs_through_its_real_wrapper_and_autograd(cuda_backends_on_cpu, heads):
    from varlen_doubles import cpu_varlen_kernels

    with cpu_varlen_kernels() as calls:
        _bf16_fwd_bwd_matches_dense("varlen", KV_HEADS[heads], seed=8)
    forward, backward = calls
    assert forward["kernel"] == "varlen" and backward["kernel"] == "varlen_backward"
    assert forward["is_causal"] and backward["is_causal"] and forward["window_size"] == [-1, 0]
    assert forward["enable_gqa"] == (heads != "mha") and forward["hk"] == KV_HEADS[heads]


@pytest.mark.parametrize("heads", ["gqa", "mqa"])
def test_torch_varlen_before_2_13_repeats_kv_heads(cuda_backends_on_cpu, monkeypatch, heads):
    """torch before 2.13 took `is_causal` and had no GQA: longcpt repeats the KV heads itself."""
    import torch.nn.attention.varlen as varlen
    from varlen_doubles import cpu_varlen_kernels, varlen_attn_before_2_13

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn_before_2_13)
    with cpu_varlen_kernels() as calls:
        _bf16_fwd_bwd_matches_dense("varlen", KV_HEADS[heads], seed=9)
    forward, backward = calls
    assert forward["is_causal"] and backward["is_causal"] and not forward["enable_gqa"]
    assert forward["hq"] == forward["hk"] == 4


@pytest.mark.parametrize("heads", KV_HEADS)
def test_flash_attn_call(cuda_backends_on_cpu, monkeypatch, heads):
    import sys
    import types

    import varlen_doubles

    module = types.SimpleNamespace(flash_attn_varlen_func=varlen_doubles.flash_attn_varlen_func)
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    varlen_doubles.calls.clear()
    _bf16_fwd_bwd_matches_dense("flash_attn", KV_HEADS[heads], seed=10)
    (call,) = varlen_doubles.calls
    assert call["causal"] and call["hk"] == KV_HEADS[heads]  # GQA natively, KV heads not repeated
