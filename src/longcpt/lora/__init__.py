"""LoRA through peft: low-rank adapters on a frozen model, plus modules trained in full (LongLoRA+).

A recipe asks for it with `model.lora` (absent: every parameter is trained):

    model:
      pretrained: path/to/base
      lora:
        r: 8                     # adapter rank
        alpha: 16                # scale alpha / r (peft's lora_alpha)
        dropout: 0.0             # on the adapters' input
        targets: [q_proj, k_proj, v_proj, o_proj]   # linear layers that get adapters
        trainable: [embed_tokens, norm, input_layernorm, post_attention_layernorm]

LongLoRA (arXiv 2309.12307, section 3.3) found adapters alone do not learn long contexts; training
the embeddings and norms in full as well (its "LoRA+") closes most of the gap for about 2% more
trainable parameters. `targets` and `trainable` name modules the way peft's `target_modules` and
`modules_to_save` do: a module whose name is the entry or ends with "." + entry (`norm` is the
final norm only; list `input_layernorm` and `post_attention_layernorm` for the blocks' norms).

What is trained: the adapters (`...q_proj.lora_A.default.weight`, `lora_B`), every parameter of the
`trainable` modules, and the attention kind's own parameters (Infini's gates). Everything else is
frozen; with bf16 training the frozen weights are held in bf16 (`longcpt.strategies.load_dtype`)
and the trained ones in float32 (under DeepSpeed, in the dtype DeepSpeed gives every parameter, with
its own float32 masters: ZeRO-3 flattens the trained partitions into one buffer of one dtype). peft injects the adapters in place (`peft.LoraModel`), so the
model stays a `CausalLM`: its loss, attention kinds, activation checkpointing and sequence
parallelism are unchanged. Checkpoints hold the trained parameters only, with the base folder's
fingerprint (`adapters.base_fingerprint`); `longcpt export` merges the adapters into a plain folder
(`adapters.merge`) or writes a peft adapter folder (`longcpt.export.adapter`).

    config.py    the `model.lora` recipe section and its validation (no torch: recipes load fast)
    adapters.py  peft's adapters on a `CausalLM`: inject, what is trained, load a checkpoint, merge
"""
