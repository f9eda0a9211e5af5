"""`torch.compile` of a `CausalLM` for training: regional (`blocks`) or whole (`model`).

    none    eager (the default)
    blocks  every decoder block is compiled in place. The blocks run the same code on parameters
            of the same shapes, so dynamo compiles the first and every other layer reuses its code
            (regional compilation, as torchtitan and litgpt offer it): the norms, RoPE, SwiGLU and
            residual adds are fused into a few kernels (C++/OpenMP on CPU, Triton on GPUs).
    model   `CausalLM.loss` is compiled whole (embedding, blocks, final norm and the chunked loss).

What stays eager, and why:
  * an attention core whose kind declares `compiles=False` (Infini-attention and `s2` plan their
    segments or groups in Python from the values of `cu_seqlens`): it runs eagerly inside its
    compiled block, one graph break per block (reported);
  * the CPU document kernel of `intra_doc` and `anchor` is one custom op (`longcpt::document_flash`),
    traced as a single opaque call.

Recompilation is bounded: the only input whose shape changes with the document layout is
`cu_seqlens` (N+1,), which `mark_dynamic` declares dynamic before every call, so a new layout reuses
the compiled code. A new window length compiles once more, after which dynamo treats lengths as
dynamic too; evaluation (no gradients) compiles its own graphs the same way. So a run compiles each
graph at most twice for training and twice for evaluation (`test_compile.py` counts them).

Compiled kernels are cached on disk by inductor in `TORCHINDUCTOR_CACHE_DIR`; `use_cache_dir` points
it at the run folder (unless it is set already), so a resumed run reuses them instead of compiling
from scratch (dynamo still traces, a few seconds).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from longcpt.model.attention import kind_spec

COMPILE_CHOICES = ("none", "blocks", "model")


def compile_model(model: nn.Module, how: str, backend: str | Callable = "inductor") -> None:
    """Compile `model` (a `CausalLM`) in place for training; its state dict keeps its keys.

    Args:
        model: the model; its blocks are `model.model.layers`.
        how: one of `COMPILE_CHOICES`.
        backend: torch.compile's backend (tests count compilations with their own).

    Raises:
        ValueError: `how` is not one of `COMPILE_CHOICES`.
    """
    if how not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {how!r}")
    if how == "none":
        return
    if not kind_spec(model.args.attention).compiles:
        for block in model.model.layers:
            core = block.self_attn.core
            core.forward = torch.compiler.disable(core.forward, reason=f"attention kind {model.args.attention!r}")
    if how == "blocks":
        for block in model.model.layers:
            block.compile(backend=backend)
    else:
        model.loss = torch.compile(model.loss, backend=backend)


def mark_dynamic(cu_seqlens: torch.Tensor | None) -> None:
    """Declare the document count dynamic before a compiled call, so a new layout does not recompile."""
    if cu_seqlens is not None:
        torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)


def use_cache_dir(folder: Path) -> Path:
    """Keep inductor's compiled kernels in `folder` unless TORCHINDUCTOR_CACHE_DIR is set; returns
    the folder in use. Call it before the first compilation."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


@dataclass
class CompileReport:
    """What dynamo did so far in this process.

    Attributes:
        graphs: graphs compiled (each layer reuses its block's).
        graph_breaks: reason (first line of dynamo's message) -> count.
        recompiles: the reason of every recompilation.
        cache_hits, cache_misses: inductor's on-disk graph cache.
    """

    graphs: int = 0
    graph_breaks: Counter = field(default_factory=Counter)
    recompiles: list[str] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0

    def summary(self) -> str:
        """One paragraph for the start of a run's log."""
        breaks = sum(self.graph_breaks.values())
        text = f"torch.compile: {self.graphs} graph(s), {breaks} graph break(s)"
        if breaks:
            text += " (" + "; ".join(f"{n}x {reason}" for reason, n in self.graph_breaks.most_common()) + ")"
        text += f", {len(self.recompiles)} recompilation(s)"
        if self.recompiles:
            text += " (" + "; ".join(dict.fromkeys(self.recompiles)) + ")"
        return text + f"; inductor cache {self.cache_hits} hit(s), {self.cache_misses} miss(es)"


def _first_line(reason: str) -> str:
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    explanation = next((line for line in lines if line.startswith("Explanation:")), "")
    head = lines[0] if lines else "unknown"
    return f"{head}: {explanation[len('Explanation:'):].strip()}" if explanation else head


def compile_report() -> CompileReport:
    """Dynamo's counters and compilation metrics since the process started (or `torch._dynamo.reset`)."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    report = CompileReport(graphs=counters["stats"]["unique_graphs"])
    for reason, n in counters["graph_break"].items():
        report.graph_breaks[_first_line(reason)] += n
    for metrics in get_compilation_metrics():
        if metrics.recompile_reason:
            report.recompiles.append(re.sub(r"\s+", " ", metrics.recompile_reason).strip()[:200])
    report.cache_hits = counters["inductor"]["fxgraph_cache_hit"]
    report.cache_misses = counters["inductor"]["fxgraph_cache_miss"]
    return report
