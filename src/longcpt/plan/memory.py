"""Per-device memory of one training step, term by term (docs/plan.md explains every term).

Four groups, as DeepSpeed's and Megatron's memory write-ups split them:

* model states: weights, gradients and optimizer state, by strategy, ZeRO stage and offload;
* activations: what the forward keeps for the backward, and the temporaries of the moment;
* buffers: DeepSpeed's gradient buckets, the sequence-parallel all-to-all copies;
* runtime: CUDA context, NCCL and allocator slack on a GPU (an assumption, stated as one).

Some terms live across steps (parameters, optimizer state, DDP's gradient buckets, ZeRO-3's
gradient partition and bucket); the others exist only at some moments of a step, so the plan is
what lives across steps plus the largest of three moments:

    loss             the loss forward: every layer's saved tensors, the chunked loss on one chunk
    backward         the backward of the last layer (with activation checkpointing: every layer's
                     input, one layer recomputed) and its gradients; ZeRO-2's gradient partition and
                     buckets exist from here to the end of the optimizer step
    optimizer step   DeepSpeed's float32 gradient copy and AdamW's temporaries

The activation terms are counted from what this code base's model actually saves (one Llama block:
two RMSNorms that normalise in float32, the q/k/v/o projections, an attention kernel that keeps
q, k, v, its output and the log-sum-exp, the SwiGLU MLP), per token of the window a device holds,
for the three ways a step can run:

    fp32   trainer.precision=32-true: everything float32
    amp    bf16-mixed without DeepSpeed: float32 weights, autocast runs the matmuls in bfloat16
    bf16   bf16-true, or bf16-mixed under DeepSpeed (which casts the model to bfloat16 and keeps
           float32 master weights in the optimizer)

With LoRA (`model.lora`) gradients and optimizer state exist for the trained parameters only
(`ModelShape.parameters`), and the frozen weights (`ModelShape.frozen`) are held in the training
precision: bf16 under bf16 training (`longcpt.strategies.load_dtype`), as DeepSpeed holds every
weight. A frozen layer keeps no input for the backward and its weight gradient is never computed;
an adapter keeps its input (under autocast a bf16 copy of it) and its rank-r output
(`layer_bytes_per_token`).

Shapes: n tokens a device holds per micro-batch (micro_batch_size x seq_len / sequence_parallel),
L layers, C hidden, F intermediate, Hq / Hk query / KV heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import SimpleNamespace

GIB = 1 << 30
# On a GPU: CUDA context and kernels, NCCL's buffers (about 1 GiB together on an A100/H100 with
# torch 2.x), and the caching allocator's slack between freed and reused blocks.
CUDA_RUNTIME_BYTES = 1 * GIB
ALLOCATOR_SLACK = 0.05
# DeepSpeed's defaults for the keys this plan reads (deepspeed/runtime/zero/config.py, 0.15-0.19).
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 500_000_000, "overlap_comm": False, "contiguous_gradients": True,
                      "stage3_max_live_parameters": 1_000_000_000, "stage3_param_persistence_threshold": 100_000,
                      "sub_group_size": 1_000_000_000}
# Bytes per element of the dtype names DeepSpeed's config takes (`data_types`, `communication_data_type`).
_DTYPE_BYTES = {"fp32": 4, "float32": 4, "float": 4, "fp16": 2, "float16": 2, "half": 2, "bf16": 2, "bfloat16": 2}
# torch.optim.AdamW keeps two moments per parameter, in the parameter's dtype.
ADAM_MOMENTS = 2


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a step holds.

    Attributes:
        name: fp32 | amp | bf16 (module docstring).
        param: a trained parameter (and its gradient).
        act: a matmul input/output kept for the backward.
        residual: the residual stream between blocks.
    """

    name: str
    param: int
    act: int
    residual: int


def precision_of(cfg) -> Precision:
    """How `cfg.trainer.precision` runs under `cfg.strategy` (module docstring)."""
    p = cfg.trainer.precision
    if p == "32-true":
        return Precision("fp32", 4, 4, 4)
    if p == "bf16-true" or cfg.strategy.name == "deepspeed":
        return Precision("bf16", 2, 2, 2)
    return Precision("amp", 4, 2, 4)


@dataclass(frozen=True)
class Item:
    """One term of the plan: its category (weights, gradients, optimizer, activations, other),
    a short name, its bytes, how it was counted, and the moments of a step it exists at (empty:
    it lives across steps)."""

    category: str
    name: str
    bytes: int
    note: str = ""
    when: tuple[str, ...] = ()

    @property
    def persistent(self) -> bool:
        return not self.when


MOMENTS = ("loss", "backward", "optimizer step")
_LATE = ("backward", "optimizer step")  # from the first gradient to the end of the optimizer step


@dataclass(frozen=True)
class Layout:
    """How a recipe spreads over devices.

    Attributes:
        device: "gpu" or "cpu".
        world: ranks in all (devices x nodes).
        sequence_parallel: ranks sharing one window.
        micro_batch: windows per rank per micro-batch.
        seq_len: tokens per window.
        tokens: n, tokens one rank holds outside attention per micro-batch.
    """

    device: str
    world: int
    sequence_parallel: int
    micro_batch: int
    seq_len: int

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len // self.sequence_parallel


def loss_chunk_size() -> int:
    """Rows of logits the chunked loss holds at once (`CausalLM.loss`'s default, used by training)."""
    from longcpt.model.llama import CausalLM

    return inspect.signature(CausalLM.loss).parameters["chunk_size"].default


# ----------------------------------------------------------------------------------------------
# Model states


def model_state_items(cfg, shape, prec: Precision, layout: Layout) -> list[Item]:
    """Weights, gradients and optimizer state on one device, by strategy, ZeRO stage and offload.

    Without DeepSpeed (auto, DDP) every rank holds everything: parameters, gradients (DDP's buckets
    are the gradients themselves: `gradient_as_bucket_view`) and AdamW's two moments, all in the
    parameter dtype. Under DeepSpeed: the parameters in the training dtype (a full copy at stage
    2; at stage 3 a 1/world shard plus what is gathered), a gradient partition in DeepSpeed's
    gradient accumulation dtype (`data_types.grad_accum_dtype`, float32 in longcpt's config), and
    float32 master weights and Adam moments, all sharded over the world; offloading moves the
    sharded parts to host memory (`host_items`). Read from DeepSpeed 0.19's code and measured on
    CPU: ZeRO-2 allocates its gradient partition in the backward and frees it after the step (on
    the GPU even with optimizer offload when it accumulates in float32 from 16-bit parameters);
    ZeRO-3 allocates it once, next to the optimizer state.
    """
    p, s, w = shape.parameters, cfg.strategy, prec.param
    world, frozen, everything = layout.world, shape.frozen, shape.weights
    if s.name != "deepspeed":
        trained = "trained parameters" if frozen else "parameters"
        items = [Item("weights", trained, p * w, f"{p:,} x {w} B")]
        if frozen:
            fw = frozen_bytes(cfg, prec)
            items.append(Item("weights", "frozen parameters", frozen * fw, f"{frozen:,} x {fw} B (the training precision)"))
        return items + [
            Item("gradients", "gradients", p * w, f"{p:,} x {w} B (DDP buckets are the gradients)"),
            Item("optimizer", "AdamW moments", ADAM_MOMENTS * p * w, f"2 x {p:,} x {w} B"),
        ]
    shard = -(-p // world)
    weight_shard = -(-everything // world)
    accum, _ = gradient_dtypes(cfg, prec)
    items = []
    if s.stage == 3:
        zero = _zero(cfg)
        if not s.offload_parameters:
            items.append(Item("weights", "parameter shard", weight_shard * w, f"{everything:,} / {world} ranks x {w} B"))
        # Parameters under the persistence threshold stay gathered on every rank. The others are
        # gathered module by module (the largest module bounds one gather) and kept while fewer than
        # stage3_max_live_parameters are live (and for a reuse within stage3_max_reuse_distance), so
        # around the turn from forward to backward up to that many more are gathered.
        sizes = shape.parameter_sizes + shape.frozen_sizes
        small = sum(n for n in sizes if n <= int(zero["stage3_param_persistence_threshold"]))
        one = min(everything - small, shape.largest_module)
        live = min(everything - small, int(zero["stage3_max_live_parameters"]) + shape.largest_module) - one
        if small:
            items.append(Item("weights", "persistent small parameters", small * w,
                              f"{small:,} x {w} B (tensors <= stage3_param_persistence_threshold)"))
        items.append(Item("weights", "gathered parameters: one module", one * w,
                          f"the largest module, {one:,} x {w} B", MOMENTS))
        if live:
            items.append(Item("weights", "gathered parameters: kept live", live * w,
                              f"min(rest, stage3_max_live_parameters) = {live:,} x {w} B", MOMENTS))
        largest_trained = shape.largest_trained_module if frozen else shape.largest_module
        items.append(Item("gradients", "gathered gradients", largest_trained * w,
                          "one module's full gradients before the reduce-scatter", _LATE))
        if not s.offload_optimizer:
            items.append(Item("gradients", "gradient partition", shard * accum, f"{p:,} / {world} x {accum} B"))
    else:
        items.append(Item("weights", "parameters", everything * w,
                          f"{everything:,} x {w} B (every rank holds all of them at stage 2)"))
        if not s.offload_optimizer or accum != w:
            items.append(Item("gradients", "gradient partition", shard * accum, f"{p:,} / {world} x {accum} B", _LATE))
    if not s.offload_optimizer:
        items.append(Item("optimizer", "float32 master weights", shard * 4, f"{p:,} / {world} x 4 B"))
        items.append(Item("optimizer", "Adam moments", shard * 8, f"2 x {p:,} / {world} x 4 B"))
    return items


def frozen_bytes(cfg, prec: Precision) -> int:
    """Bytes per frozen (LoRA base) weight: the dtype it is loaded in and never leaves, bf16 under bf16
    training (`longcpt.strategies.load_dtype`)."""
    from longcpt.strategies import load_dtype

    return 2 if load_dtype(cfg) == "bf16" or prec.param == 2 else 4


def gradient_dtypes(cfg, prec: Precision) -> tuple[int, int]:
    """Bytes per element of DeepSpeed's gradient accumulation and gradient communication.

    Both come from the config `longcpt train` passes (`longcpt.strategies.deepspeed_config`: float32
    for both); unset, DeepSpeed uses the parameters' dtype.
    """
    from longcpt.strategies import deepspeed_config

    config = deepspeed_config(cfg)
    accum = (config.get("data_types") or {}).get("grad_accum_dtype")
    comm = config.get("communication_data_type")
    return _DTYPE_BYTES.get(str(accum).lower(), prec.param), _DTYPE_BYTES.get(str(comm).lower(), prec.param)


def optimizer_step_items(cfg, shape, prec: Precision, layout: Layout) -> list[Item]:
    """Temporaries of the optimizer step (activations are gone by then).

    DeepSpeed hands the optimizer a float32 flat copy of the rank's gradient partition: ZeRO-3
    always copies (it flattens the per-parameter gradient partitions, one sub-group of at most
    `sub_group_size` elements at a time, then converts them to float32); ZeRO-2 uses its float32
    partition as it is, and copies only a 16-bit one. AdamW's update makes one parameter-sized
    temporary (the square root of the second moment) per tensor it updates: DeepSpeed's flat
    partition, or every parameter at once with the foreach implementation torch uses on GPUs (one
    parameter at a time on CPU). With optimizer offload the step runs on the host.
    """
    p, s = shape.parameters, cfg.strategy
    if s.name == "deepspeed":
        if s.offload_optimizer:
            return []
        world = layout.world
        shard = -(-p // world)
        accum, _ = gradient_dtypes(cfg, prec)
        chunk = min(shard, int(_zero(cfg)["sub_group_size"])) if s.stage == 3 else shard
        items = []
        if s.stage == 3 or accum != 4:
            copies = 4 + (accum if s.stage == 3 and accum != 4 else 0)  # a 16-bit flat copy, then its float32 one
            items.append(Item("activations", "optimizer step: float32 gradient copy", copies * chunk,
                              f"{chunk:,} x {copies} B (min(partition, sub_group_size))" if s.stage == 3
                              else f"{p:,} / {world} x 4 B", ("optimizer step",)))
        items.append(Item("activations", "optimizer step: AdamW temporaries", 2 * 4 * chunk,
                          f"2 x {chunk:,} x 4 B", ("optimizer step",)))
        return items
    updated = p if layout.device == "gpu" else (shape.largest_trained_module if shape.frozen else shape.largest_module)
    return [Item("activations", "optimizer step: AdamW temporaries", updated * prec.param,
                 f"{updated:,} x {prec.param} B", ("optimizer step",))]


def _zero(cfg) -> dict:
    """The ZeRO section `longcpt train` passes to DeepSpeed, with DeepSpeed's defaults filled in."""
    from longcpt.strategies import deepspeed_config

    return {**DEEPSPEED_DEFAULTS, **deepspeed_config(cfg)["zero_optimization"]}


def buffer_items(cfg, shape, prec: Precision, layout: Layout) -> list[Item]:
    """DeepSpeed's gradient buckets and the sequence-parallel all-to-all copies.

    ZeRO-3 allocates one bucket of `reduce_bucket_size` elements in the communication dtype once,
    with or without offload. ZeRO-2 allocates its buckets (two with `overlap_comm`) in the
    parameters' dtype at the start of every backward and frees them at its end; a bucket is
    converted to the communication dtype while it is reduced.
    """
    items = []
    s = cfg.strategy
    if s.name == "deepspeed":
        zero = _zero(cfg)
        bucket = int(zero["reduce_bucket_size"])  # allocated in full, however small the model
        _, comm = gradient_dtypes(cfg, prec)
        if s.stage == 3:
            items.append(Item("other", "gradient reduce bucket", bucket * comm,
                              f"reduce_bucket_size {bucket:,} x {comm} B (communication dtype)"))
        elif zero["contiguous_gradients"]:
            w = prec.param
            count = 2 if zero["overlap_comm"] else 1
            items.append(Item("other", "gradient reduce buckets", count * bucket * w,
                              f"{count} x reduce_bucket_size {bucket:,} x {w} B", ("backward",)))
            if comm != w:
                items.append(Item("other", "bucket being reduced, in the communication dtype", bucket * comm,
                                  f"reduce_bucket_size {bucket:,} x {comm} B", ("backward",)))
        if s.stage == 2 and s.offload_optimizer:
            largest = max(shape.parameter_sizes, default=shape.largest_module)
            items.append(Item("other", "offload staging buffer", largest * prec.param,
                              f"the largest parameter, {largest:,} x {prec.param} B"))
    sp = layout.sequence_parallel
    if sp > 1:
        n = layout.tokens
        per_token = (shape.heads + 2 * max(shape.kv_heads, sp)) * shape.head_dim * prec.act
        items.append(Item("other", "all-to-all send/receive copies", 2 * n * per_token,
                          f"q, k, v of one layer, {n:,} tokens, sent and received", MOMENTS[:2]))
    return items


def host_items(cfg, shape, prec: Precision, layout: Layout) -> list[Item]:
    """Host memory of one rank: what DeepSpeed offloads, and the whole-model copy of loading.

    Offloaded states are pinned (page-locked) host memory: with `offload_optimizer` the float32
    master weights, the Adam moments and the gradient partition (ZeRO-3's in the accumulation
    dtype, ZeRO-2's in float32) plus ZeRO-2's staging buffer of the largest parameter; with
    `offload_parameters` (stage 3) the 16-bit parameter shard. Loading, before training starts
    (`when` = ("load",)): a rank that builds the whole model (every strategy except ZeRO-3 with
    `model.pretrained`, which fills its partition from rank 0's reads) holds one copy of it in the
    dtype it loads in (`longcpt.strategies.load_dtype`) until it moves to the GPU. Python, CUDA and
    the data loaders' own memory are not counted.
    """
    from longcpt.strategies import builds_partitioned, load_dtype

    p, s = shape.parameters, cfg.strategy
    shard = -(-p // layout.world)
    items = []
    if not builds_partitioned(cfg):
        w, everything = (2 if load_dtype(cfg) == "bf16" else 4), shape.weights
        items.append(Item("host", "whole model while loading", everything * w, f"{everything:,} x {w} B, on every rank",
                          ("load",)))
    if s.name != "deepspeed":
        return items
    if s.offload_optimizer:
        accum, _ = gradient_dtypes(cfg, prec)
        grad = accum if s.stage == 3 else 4
        items += [Item("host", "float32 master weights (offloaded)", shard * 4, f"{p:,} / {layout.world} x 4 B"),
                  Item("host", "Adam moments (offloaded)", shard * 8, f"2 x {p:,} / {layout.world} x 4 B"),
                  Item("host", "gradient partition (offloaded)", shard * grad, f"{p:,} / {layout.world} x {grad} B")]
        if s.stage == 2:
            largest = max(shape.parameter_sizes, default=shape.largest_module)
            items.append(Item("host", "offload staging buffer", largest * prec.param,
                              f"the largest parameter, {largest:,} x {prec.param} B"))
    if s.offload_parameters:
        weight_shard = -(-shape.weights // layout.world)
        items.append(Item("host", "parameter shard (offloaded)", weight_shard * prec.param,
                          f"{shape.weights:,} / {layout.world} x {prec.param} B"))
    return items


def host_bytes(items: list[Item]) -> int:
    """One rank's host peak: the offloaded states, or the loading copy when that is larger."""
    states = sum(i.bytes for i in items if i.persistent)
    return max(states, sum(i.bytes for i in items if "load" in i.when))


def runtime_items(prec: Precision, layout: Layout, subtotal: int) -> list[Item]:
    """CUDA context, NCCL and allocator slack on a GPU; nothing is assumed on CPU."""
    if layout.device != "gpu":
        return []
    return [Item("other", "CUDA context + NCCL (assumed)", CUDA_RUNTIME_BYTES, "1 GiB"),
            Item("other", "allocator slack (assumed)", int(ALLOCATOR_SLACK * subtotal),
                 f"{ALLOCATOR_SLACK:.0%} of the tensors above")]


# ----------------------------------------------------------------------------------------------
# Activations


def layer_bytes_per_token(shape, prec: Precision, kind: str, layout: Layout, options: dict | None = None) -> int:
    """Bytes one block keeps for the backward, per token a device holds (no checkpointing).

    Counted from `longcpt.model.llama.Block` (docs/plan.md has the list):
      * each RMSNorm: its float32 input and normalised output, and 1/rms;
      * the projections' inputs: the normalised hidden state (under autocast one bfloat16 copy per
        projection: q, k, v, gate, up);
      * attention: rotated q and k, v, the output and the float32 log-sum-exp per head;
      * MLP: gate, up, silu(gate) and their product.
    Extra copies: under sequence parallelism the output exists before and after its all-to-all;
    the attention kind adds its own (its `layer_bytes` plan term: `intra_doc`/`anchor` on CPU keep
    the per-document output and its re-ordered copy, `infini` its float32 memory read).
    """
    from longcpt.plan.compute import plan_terms

    c, f, hq, d = shape.hidden, shape.intermediate, shape.heads, shape.head_dim
    a, r = prec.act, prec.residual
    sp = layout.sequence_parallel
    hqd, hkd = hq * d, max(shape.kv_heads, sp) * d  # after the all-to-all: KV heads repeated up to sp
    if shape.lora is None:
        norms = 2 * (4 * c + r * c + 4)
        inputs = (5 if prec.name == "amp" else 2) * a * c
        mlp = 4 * a * f
    else:
        norms, inputs, mlp = _lora_block_terms(shape, prec)
    attention = a * (2 * hqd + 2 * hkd) + 4 * hq
    extra = a * hqd if sp > 1 else 0
    own = plan_terms(kind).layer_bytes
    if own is not None:
        extra += own(shape, a, layout.device, options or {})
    return norms + inputs + attention + mlp + extra


def _lora_block_terms(shape, prec: Precision) -> tuple[int, int, int]:
    """(norms, projection inputs, MLP) bytes per token of a block whose frozen layers keep nothing for
    their weights' gradients (measured with saved-tensor hooks, docs/plan.md):
      * a norm keeps its float32 input and 1/rms, and its normalised output only when its weight is trained;
      * a projection's input is kept when it has an adapter or a trained weight: once for q/k/v and once
        for gate/up without autocast (the same tensor), one bfloat16 copy per such layer under autocast;
        o_proj's and down_proj's inputs are the attention output and the MLP product, kept anyway for
        the attention and kept for down_proj only when it needs it; under autocast peft hands an
        adapter its input in float32 and autocast copies it back, one copy per adapted o/down;
      * every adapter keeps its rank-r output (B's input).
    """
    lora, c, f, hqd = shape.lora, shape.hidden, shape.intermediate, shape.heads * shape.head_dim
    a, r = prec.act, prec.residual
    norms = sum(4 * c + 4 + (r * c if lora.keeps_input(n) else 0) for n in ("input_layernorm", "post_attention_layernorm"))
    attn_in = [lora.keeps_input(n) for n in ("q_proj", "k_proj", "v_proj")]
    mlp_in = [lora.keeps_input(n) for n in ("gate_proj", "up_proj")]
    if prec.name == "amp":
        inputs = a * c * (sum(attn_in) + sum(mlp_in)) + a * hqd * ("o_proj" in lora.adapted)
    else:
        inputs = a * c * (any(attn_in) + any(mlp_in))
    mlp = 3 * a * f + a * f * lora.keeps_input("down_proj")
    return norms, inputs + a * lora.rank * len(lora.adapted), mlp


def activation_items(cfg, shape, prec: Precision, layout: Layout) -> list[Item]:
    """Activations and temporaries, each tagged with the moment it belongs to (module docstring)."""
    from longcpt.plan.compute import plan_terms

    kind, options = cfg.attention.kind, cfg.attention.options
    terms = plan_terms(kind)
    c, f, v, layers = shape.hidden, shape.intermediate, shape.vocab, shape.layers
    a, r = prec.act, prec.residual
    n = layout.tokens
    note_tokens = f"{n:,} tokens"
    if terms.live_tokens is not None:  # a kind whose training holds part of the window at a time
        n, note_tokens = terms.live_tokens(n, layout.micro_batch, options)
    per_layer = layer_bytes_per_token(shape, prec, kind, layout, options)
    checkpointing = cfg.trainer.activation_checkpointing
    saved_per_layer = r * c if checkpointing else per_layer
    # ids, final norm; RoPE's float32 cos/sin cover the whole window under sequence parallelism
    # (each rank rotates all T tokens of its heads after the all-to-all)
    outside = 8 + 8 * shape.head_dim * layout.sequence_parallel + (4 * c + r * c + 4)
    chunk = min(loss_chunk_size(), n)
    # The chunk's float32 logits and log-softmax (8 B per logit), or later its softmax gradient (in
    # the matmul dtype) with the LM-head gradient's matmul output and its float32 copy.
    grad_logits = {"fp32": 4, "bf16": 2, "amp": 4 + 2}[prec.name]  # amp: float32 + autocast's bf16 copy
    head_trained = shape.lora is None or shape.lora.head  # a frozen head gets no weight gradient
    head_grad = (4 if prec.name == "fp32" else 2 + 4) if head_trained else 0
    chunk_temp = max(8 * chunk * v, grad_logits * chunk * v + head_grad * v * c)
    # The backward of the last block: the MLP's product, gate and up gradients (while its product
    # input is already freed: + 2 F) and the residual stream's incoming and accumulated gradients.
    backward_work = n * (2 * a * f + 2 * r * c)

    def at(moment: str, category: str, name: str, size: int, note: str) -> Item:
        return Item(category, name, size, note, (moment,))

    saved_note = f"{layers} x {note_tokens} x {saved_per_layer:,} B" + (
        " (checkpointed: block inputs)" if checkpointing else "")
    items = [
        at("loss", "activations", "layers: saved for backward", layers * n * saved_per_layer, saved_note),
        at("loss", "activations", "final norm, ids, RoPE tables", n * outside, f"{n:,} x {outside:,} B"),
        at("loss", "activations", "loss: hidden + its gradient", 2 * n * r * c, f"2 x {n:,} x {c} x {r} B"),
        at("loss", "activations", "loss: one chunk of logits", chunk_temp,
           f"chunk {chunk:,} x vocab {v:,}, float32 + working copies"),
        at("backward", "activations", "layers: saved for backward", layers * n * saved_per_layer, saved_note),
    ]
    if head_trained:
        items.insert(3, at("loss", "activations", "loss: LM-head gradient (float32)", 4 * v * c, f"{v:,} x {c} x 4 B"))
    if checkpointing:
        items.append(at("backward", "activations", "one layer recomputed", n * per_layer, f"{n:,} x {per_layer:,} B"))
    items.append(at("backward", "activations", "backward working memory", backward_work,
                    f"{n:,} x (2 x {f} x {a} + 2 x {c} x {r}) B"))
    if prec.name == "amp":  # of the float32 weights: LoRA's frozen ones are bf16 already
        copied = shape.matmul_parameters - shape.frozen_matmul
        items.append(Item("activations", "autocast bfloat16 weight copies", 2 * copied, f"{copied:,} x 2 B", MOMENTS[:2]))
    if terms.activations is not None:
        context = SimpleNamespace(cfg=cfg, shape=shape, prec=prec, layout=layout, tokens=n, item=Item, moments=MOMENTS)
        items = terms.activations(items, context)
    return items + optimizer_step_items(cfg, shape, prec, layout)


@dataclass(frozen=True)
class Memory:
    """The memory plan of one device.

    Attributes:
        items: what lives across steps, the terms of the peak moment, and the GPU runtime.
        peak: the moment of the peak ("loss", "backward" or "optimizer step").
        moments: bytes by category of the terms that exist only at each moment.
    """

    items: list[Item]
    peak: str
    moments: dict[str, dict[str, int]]


def memory_plan(cfg, shape, prec: Precision, layout: Layout) -> Memory:
    """Everything one device holds at the peak of a step (module docstring)."""
    items = (model_state_items(cfg, shape, prec, layout) + buffer_items(cfg, shape, prec, layout)
             + activation_items(cfg, shape, prec, layout))
    persistent = [i for i in items if i.persistent]
    moments = {m: [i for i in items if m in i.when] for m in MOMENTS}
    peak = max(MOMENTS, key=lambda m: sum(i.bytes for i in moments[m]))
    chosen = persistent + moments[peak]
    summary = {m: {c: sum(i.bytes for i in terms if i.category == c) for c in {i.category for i in terms}}
               for m, terms in moments.items()}
    return Memory(chosen + runtime_items(prec, layout, sum(i.bytes for i in chosen)), peak, summary)
