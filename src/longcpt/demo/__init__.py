"""`python -m longcpt.demo --output demo` (what `make demo` runs): continual pretraining on a CPU.

    demo corpus (the standard library's sources and docstrings) -> BPE tokenizer -> train/held-out
      -> pretraining at 512 tokens with AnchorAttention         recipes/tiny_cpu.yaml
      -> perplexity by position at 4K (before)                  longcpt eval ppl
      -> context extension to 4K, rope_theta raised             recipes/tiny_cpu_extend.yaml
      -> perplexity by position at 4K (after)
      -> passkey prompts -> warm-up (loss on every token)       recipes/tiny_cpu_passkey_warmup.yaml
      -> passkey fine-tuning, loss on the answer, on 96-128-token prompts, then on prompts
         spread over 96-512 and over 96-2,048 tokens (a length curriculum; the longer prompts
         packed several to a row)                               recipes/tiny_cpu_passkey{,_512,_2k}.yaml
      -> passkey sweep from 128 tokens to twice the window      longcpt eval passkey
      -> loss.png, ppl.png, passkey/passkey.png and summary.txt: the measured numbers, every
         artifact, stage times and the commands to go further

Sized for 2 CPU cores (about 11.5 minutes of stages on a quiet machine); every core is used
(`use_all_cores`). Each training run is exported to Hugging Face format (`RUN/hf`).

Resuming: every stage writes its outputs completely or not at all and then a marker
(`OUTPUT/stages/NAME.json`, `longcpt.demo.stages`); running the same command again skips the
finished stages and continues an interrupted training run from its last checkpoint.

Options: `--quick` runs the same stages shrunk to about a minute (what the tests run);
`--stop-after STAGE`; `key=value` overrides every training recipe, `STAGE.key=value` one of them
(`pretrain`, `extend`, `warmup`, `finetune`, `upto512`, `upto2k`), e.g.
`pretrain.trainer.max_steps=100`.
"""

from longcpt.demo.pipeline import FULL, QUICK, Demo, DemoPlan, main

__all__ = ["Demo", "DemoPlan", "FULL", "QUICK", "main"]
