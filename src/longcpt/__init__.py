"""longcpt: continual pretraining of long-context Llama-family models.

Public API (docs/reference.md)::

    import longcpt
    model = longcpt.from_pretrained(hf_dir, attention="anchor", dtype=torch.bfloat16)
    logits = model(input_ids, position_ids=pos, cu_seqlens=cu)
    longcpt.save_pretrained(model, out_dir)
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `longcpt --help` and the data scripts do not pay for importing torch models.
    if name in ("from_pretrained", "CausalLM", "ModelArgs"):
        from longcpt import model

        return getattr(model, name)
    if name == "save_pretrained":
        from longcpt.export.hf import save_pretrained

        return save_pretrained
    raise AttributeError(f"module 'longcpt' has no attribute {name!r}")


__all__ = ["from_pretrained", "save_pretrained", "CausalLM", "ModelArgs", "__version__"]
