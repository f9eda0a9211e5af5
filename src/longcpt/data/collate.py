"""Packed windows -> the batch every model consumer uses (the contract is `longcpt.batch`).

    {"input_ids": (B, T) int64, "labels": (B, T) int64 (-100 ignored),
     "position_ids": (B, T) int64, "cu_seqlens": (N+1,) int32}

which is what `CausalLM.loss(input_ids, labels, position_ids, cu_seqlens)` takes. Labels come
aligned from packing (labels[t] is the target of token t), so the trainer does no shifting.
`cu_seqlens` is the same for every attention kind; the position ids follow the rule the kind
declares (`longcpt.model.attention`: arange for `full`, restart per document for `intra_doc` and
`infini`, arange with each BOS at 0 for `anchor`). A kind that attends across documents (`full`)
simply ignores `cu_seqlens`. The padding pseudo-document counts as a document, so nothing attends
to or from it across a boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from longcpt.batch import cu_seqlens_for, position_ids


class Collator:
    """Stack windows from `pack_documents` into one batch: `Collator(kind)(windows)`.

    A picklable `collate_fn` for DataLoaders, bound to the position rule of attention `kind`.
    Returns `{"input_ids", "labels", "position_ids"}` (B, T) int64 and `"cu_seqlens"` (N+1,) int32.

    Raises:
        LongcptError: an unknown attention kind.
    """

    def __init__(self, kind: str):
        from longcpt.model.attention import kind_spec

        self.kind = kind
        self.rule = kind_spec(kind).positions

    def __call__(self, windows: Sequence[dict]) -> dict[str, torch.Tensor]:
        input_ids = np.stack([np.asarray(w["input_ids"], dtype=np.int64) for w in windows])  # (B, T)
        b, t = input_ids.shape
        cu = cu_seqlens_for([w["doc_lens"] for w in windows])  # (N+1,)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(np.stack([np.asarray(w["labels"], dtype=np.int64) for w in windows])),
            "position_ids": position_ids(self.rule, cu, b, t),
            "cu_seqlens": cu,
        }
