"""`trainer.compile` at the model level (`longcpt.model.compile`): compiled losses and gradients
equal eager ones, layers share one compilation, new document layouts do not recompile, graph
breaks are counted and named."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_args
from torch._dynamo.testing import CompileCounter

from longcpt.batch import cu_seqlens_for, position_ids
from longcpt.model import CausalLM
from longcpt.model.attention import kind_spec
from longcpt.model.compile import compile_model, compile_report, mark_dynamic

LAYOUTS = ([[20, 30, 14], [64]], [[5, 59], [33, 31]], [[64], [1, 63]])  # 2 rows of 64 tokens


def batch(kind: str, rows: list[list[int]], seed: int = 0):
    t = sum(rows[0])
    cu = cu_seqlens_for(rows)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (len(rows), t), generator=g)
    return ids, torch.roll(ids, -1, 1), position_ids(kind_spec(kind).positions, cu, len(rows), t), cu


def pair(kind: str, how: str, backend="inductor", checkpointing: bool = False):
    torch.manual_seed(0)
    args = tiny_args(attention=kind, initializer_range=0.2)
    eager = CausalLM(args)
    compiled = CausalLM(args)
    compiled.load_state_dict(eager.state_dict())
    for model in (eager, compiled):
        model.activation_checkpointing = checkpointing
    compile_model(compiled, how, backend)
    return eager, compiled


def step(model, kind: str, rows, seed: int = 0) -> torch.Tensor:
    ids, labels, pos, cu = batch(kind, rows, seed)
    mark_dynamic(cu)
    model.zero_grad(set_to_none=True)
    loss = model.loss(ids, labels, pos, cu)
    loss.backward()
    return loss.detach()


def reset_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.clear_compilation_metrics()


@pytest.fixture
def fresh_dynamo():
    reset_dynamo()
    yield
    reset_dynamo()


@pytest.mark.parametrize("kind", ["full", "anchor", "infini"])
def test_layers_share_one_compilation_and_layouts_do_not_recompile(kind, fresh_dynamo):
    """Three document layouts through two compiled blocks: one graph, compiled once (four for
    infini: its core runs eagerly, which splits the block and its attention module in two graphs
    each); without `mark_dynamic`, the second layout of a document kind recompiles (the control)."""
    counter = CompileCounter()
    _, model = pair(kind, "blocks", counter)
    for i, rows in enumerate(LAYOUTS):
        step(model, kind, rows, i)
    assert counter.frame_count == (4 if kind == "infini" else 1), counter.frame_count
    assert compile_report().recompiles == []
    if kind == "anchor":
        reset_dynamo()
        counter = CompileCounter()
        _, model = pair(kind, "blocks", counter)
        for i, rows in enumerate(LAYOUTS):
            ids, labels, pos, cu = batch(kind, rows, i)
            model.loss(ids, labels, pos, cu).backward()  # no mark_dynamic
        assert counter.frame_count == 2


def test_graph_breaks_are_counted_with_their_cause(fresh_dynamo):
    _, model = pair("infini", "blocks", CompileCounter())
    step(model, "infini", LAYOUTS[0])
    report = compile_report()
    assert sum(report.graph_breaks.values()) == 2  # the eager core, seen from the block and its attention
    (reason,) = report.graph_breaks
    assert "torch.compiler.disable" in reason and "infini" in reason
    assert "2 graph break(s) (2x Skip calling" in report.summary()

    reset_dynamo()
    _, model = pair("anchor", "blocks", CompileCounter())
    step(model, "anchor", LAYOUTS[0])
    assert compile_report().graph_breaks == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, how, checkpointing",
    [("full", "blocks", False), ("anchor", "blocks", False), ("intra_doc", "blocks", True),
     ("infini", "blocks", False), ("anchor", "model", False)],
)
def test_compiled_loss_and_gradients_equal_eager(kind, how, checkpointing, inductor_cache, fresh_dynamo):
    """Inductor's code (C++ on CPU) against eager, fp32, over two layouts: the loss within 1e-5."""
    eager, compiled = pair(kind, how, checkpointing=checkpointing)
    for i, rows in enumerate(LAYOUTS[:2]):
        want, got = step(eager, kind, rows, i), step(compiled, kind, rows, i)
        assert abs(got.item() - want.item()) <= 1e-5, (got.item(), want.item())
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert compile_report().graphs >= 1  # the compiled code ran (no silent fallback to eager)
