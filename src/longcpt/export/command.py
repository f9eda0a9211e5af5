"""`longcpt export CHECKPOINT --output DIR [--dtype D] [--tokenizer T] [--adapter-only [--base BASE]]`.

A whole Hugging Face folder (`longcpt.export.convert`; a LoRA run's adapters merged in), or with
`--adapter-only` a LoRA run's peft adapter folder (`longcpt.export.adapter`).
"""

from __future__ import annotations

from longcpt.errors import LongcptError


def run(args) -> int:
    """Entry point of `longcpt export` (see `longcpt.cli`)."""
    if args.adapter_only:
        from longcpt.export.adapter import write_adapter

        out, base = write_adapter(args.checkpoint, args.output, args.dtype, args.tokenizer, args.base)
        print(f"longcpt export: wrote the peft adapter folder {out} (base model: {base})")
        return 0
    if args.base is not None:
        raise LongcptError("--base DIR writes the base model an adapter folder loads on; it goes with --adapter-only")
    from longcpt.export.convert import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, args.dtype, args.tokenizer)
    print(f"longcpt export: wrote {out}")
    return 0
