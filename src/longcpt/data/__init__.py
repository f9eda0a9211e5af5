"""Packed multi-document data: preparation, packing, collation, DataModules (docs/reference.md).

    raw text --records.py--> validated records --tokenizer.py / prepare.py--> tokenized data set
        --mix.py--> mixed data set --stream.py (packing.py)--> windows --collate.py--> batches
        --datamodule.py--> Lightning

The batch format itself (labels, cu_seqlens, position rules) is `longcpt.batch`.
Names are imported lazily, so the `data_prep/` scripts start without loading torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "pack_documents": "packing",
    "plan_windows": "packing",
    "Collator": "collate",
    "load_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "prepare_corpus": "prepare",
    "mix_datasets": "mix",
    "TokenStore": "stream",
    "WindowStream": "stream",
    "PretrainDataModule": "datamodule",
    "build_datamodule": "datamodule",
    "register_datamodule": "datamodule",
    "DATAMODULES": "datamodule",
    "build_demo_corpus": "demo_corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"longcpt.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'longcpt.data' has no attribute {name!r}")
