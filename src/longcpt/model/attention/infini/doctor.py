"""`longcpt doctor`'s check of Infini-attention: the memory under bf16 autocast.

A document is streamed segment by segment under bf16 autocast: M and z must stay float32 and
finite, the logits close to the float32 run, and a training step's loss and gradients finite
(bf16 sums overflow to inf/NaN within a couple of segments; see `core.py`).
"""

from __future__ import annotations

import torch

# Logits under bf16 autocast against float32, relative.
LOGIT_TOLERANCE = 0.05


def checks(tools) -> list:
    """The doctor's checks of the kind: (section, name, run) (`longcpt.doctor.kernels.KindCheckTools`)."""
    return [(tools.KERNELS, "infini memory", lambda: check_memory(tools))]


def check_memory(tools):
    """Stream a document through Infini-attention under bf16 autocast (module docstring)."""
    from longcpt.model.attention.infini.core import InfiniMemory
    from longcpt.model.llama import CausalLM

    device, quick = tools.device, tools.quick
    segment, chunks = (16, 6) if quick else (32, 32)
    torch.manual_seed(0)
    model = CausalLM(tools.tiny_args("infini", segment_len=segment)).to(device)
    ids = torch.randint(3, 256, (1, segment * chunks), generator=torch.Generator().manual_seed(1)).to(device)
    logits = {}
    problems = []
    for autocast in (False, True):
        state: dict = {}
        outs = []
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            for start in range(0, ids.shape[1], segment):
                pos = torch.arange(start, start + segment, device=device)[None]
                outs.append(model(ids[:, start:start + segment], position_ids=pos, state=state).float())
                for layer, memory in state.items():
                    if not isinstance(memory, InfiniMemory) or memory.memory is None:
                        continue
                    for name, t in (("M", memory.memory), ("z", memory.norm)):
                        if t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
                            problems.append(f"layer {layer} {name} is {t.dtype}"
                                            f"{'' if bool(torch.isfinite(t).all()) else ' and not finite'}")
        logits[autocast] = torch.cat(outs, 1)
    err = tools.relative_error(logits[True], logits[False].double().cpu())
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "position_ids": torch.arange(ids.shape[1],
             device=device)[None], "cu_seqlens": torch.tensor([0, ids.shape[1]], dtype=torch.int32, device=device)}
    loss, grads = tools.model_loss_and_grads(model, batch, device, autocast=True)
    if not (torch.isfinite(torch.tensor(loss)) and bool(torch.isfinite(grads).all())):
        problems.append(f"training loss {loss} or its gradients not finite under bf16 autocast")
    if not err <= LOGIT_TOLERANCE:
        problems.append(f"logits under bf16 autocast differ from float32 by {err:.1e} (tol {LOGIT_TOLERANCE:.0e})")
    line = (f"{chunks} segments of {segment} streamed under bf16 autocast: memory float32 and finite, "
            f"logits rel error {err:.1e} vs float32, training loss {loss:.3f} finite")
    data = {"logit_error": err, "segments": chunks, "loss": loss}
    if problems:
        return tools.result(tools.KERNELS, "infini memory bf16", tools.FAIL, "; ".join(problems[:3]), data)
    return tools.result(tools.KERNELS, "infini memory bf16", tools.PASS, line, data)
