"""Read Hugging Face model folders into longcpt models (`longcpt.from_pretrained`).

Import reads `config.json` (transformers v4 or v5 style) and weights from `model.safetensors`,
sharded safetensors with `model.safetensors.index.json`, or `pytorch_model.bin` (sharded too),
loaded with `weights_only=True`. Parameter names are transformers' own, so the weight map is the
identity; keys we do not know, or keys we need and do not find, fail with their names.

Files are opened lazily (`WeightFiles`): a tensor is read when it is copied into the model.
Under DeepSpeed ZeRO-3 (`partitioned=True`, called inside `deepspeed.zero.Init`) each rank
builds only its partition of every parameter and rank 0 fills them module by module, so no rank
ever holds the whole model (`build_model`).

Writing folders is `longcpt.export.hf` (`longcpt.save_pretrained`).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from longcpt.errors import LongcptError
from longcpt.model.attention import DEFAULT_KIND, exported_kind, kind_spec, switch_problem
from longcpt.model.config import ModelArgs
from longcpt.model.llama import CausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Keys old checkpoints carry that hold nothing we need (RoPE tables are recomputed).
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise LongcptError(f"{path}: no config.json; expected a Hugging Face model folder")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LongcptError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None


class WeightFiles(Mapping[str, torch.Tensor]):
    """The tensors of an HF folder by name, each read from its file only when asked for.

    Opening reads only the file headers (names and shapes). A safetensors tensor is read by opening
    its file for that one read, so the memory map is released right after and the file's pages do
    not pile up in the process's resident memory; `.bin` files are loaded with
    `torch.load(mmap=True)`. So every rank can list and check the tensors of a 70B folder, and the
    rank that fills the model holds one tensor at a time. An old non-zip `.bin` (torch < 1.6's
    format) cannot be memory-mapped and is read whole, only where `whole_files` allows it.

    Args:
        path: the HF folder.
        whole_files: accept old non-zip `.bin` files, read whole into memory when opened.

    Raises:
        LongcptError: no weight file, an index naming a missing shard, or an old non-zip `.bin`
            where `whole_files` is False.
    """

    def __init__(self, path: str | os.PathLike, whole_files: bool = True):
        self.path = Path(path)
        self._source: dict[str, Path | dict[str, torch.Tensor]] = {}  # name -> safetensors file or .bin dict
        self._shape: dict[str, tuple[int, ...]] = {}
        for file in _weight_files(self.path):
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        self._source[name], self._shape[name] = file, tuple(f.get_slice(name).get_shape())
            else:
                loaded = _load_bin(file, whole_files)
                for name, tensor in loaded.items():
                    self._source[name], self._shape[name] = loaded, tuple(tensor.shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self._source[name]
        if isinstance(source, dict):
            return source[name]
        with safe_open(str(source), framework="pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor `name`, without reading it."""
        return self._shape[name]

    def drop(self, names: Iterable[str]) -> None:
        """Leave tensors out (e.g. a kind's own parameters when the folder is loaded as another kind)."""
        for name in names:
            del self._source[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def _weight_files(path: Path) -> list[Path]:
    """The weight files of an HF folder: the shards of an index, or the single file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise LongcptError(f"{index}: shard(s) {', '.join(missing)} not found in {path}")
            return [path / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise LongcptError(
        f"{path}: no weights found (looked for model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin, pytorch_model.bin.index.json)"
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder, whatever the weight format (`WeightFiles`, read whole).

    Raises:
        LongcptError: no weight file, or an index naming a missing shard.
    """
    weights = WeightFiles(path)
    return {name: weights[name] for name in weights}


def _load_bin(file: Path, whole_files: bool) -> dict[str, torch.Tensor]:
    if zipfile.is_zipfile(file):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    if not whole_files:
        raise LongcptError(
            f"{file}: an old non-zip PyTorch file (saved by torch < 1.6), which cannot be read one tensor at a "
            "time: under ZeRO-3 every rank would hold the whole model. Convert the folder once to safetensors: "
            "python -c \"import longcpt, sys; longcpt.save_pretrained(longcpt.from_pretrained(sys.argv[1]), "
            "sys.argv[2])\" IN_FOLDER OUT_FOLDER, and point model.pretrained at OUT_FOLDER")
    return torch.load(file, map_location="cpu", weights_only=True)


def build_model(
    args: ModelArgs, state: Mapping[str, torch.Tensor] | None = None, source: str = "", partitioned: bool = False
) -> CausalLM:
    """Instantiate `CausalLM(args)` and load `state` (strictly), or keep the fresh init if None.

    Parameters the attention kind adds (its own parameters, under `...self_attn.core.`) may be
    absent from `state`; they keep their own initialisation.

    Args:
        args: the architecture and attention kind.
        state: tensors by HF name: a dict, or a lazy `WeightFiles`.
        source: how errors name where `state` came from.
        partitioned: build inside the caller's `deepspeed.zero.Init` context (ZeRO-3), so that
            each rank holds only its partition of every parameter, then fill the parameters one
            module at a time from rank 0 (`_fill_partitioned`). No rank ever holds the whole model.

    Raises:
        LongcptError: unknown or missing keys, or a tensor whose shape does not fit.
    """
    if state is None:
        return CausalLM(args)
    if partitioned:
        # Partitioned as it is built. No init pass: under zero.Init every `apply` gathers each
        # module on all ranks and broadcasts it back, a whole-model pass the loading overwrites.
        model = CausalLM(args, init_weights=False)
        given, _ = _checked_keys(model, args, state, source)
        _fill_partitioned(model, state, given, source)
        return model
    with torch.device("meta"):
        model = CausalLM(args)
    given, new = _checked_keys(model, args, state, source)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.load_state_dict({k: state[k] for k in given}, strict=False)
    if new:  # the attention kind's own new parameters: initialise them
        for block in model.model.layers:
            block.self_attn.core.reset_parameters()
    return model


def _checked_keys(
    model: CausalLM, args: ModelArgs, state: Mapping[str, torch.Tensor], source: str
) -> tuple[set[str], set[str]]:
    """(names of `state` to load into `model`, the model's parameters that `state` lacks).

    A tied LM head and old RoPE tables are left out; the only parameters allowed to be absent are
    the attention kind's own (`...self_attn.core.*`).

    Raises:
        LongcptError: unknown keys, or missing keys other than the attention kind's own parameters.
    """
    expected = set(model.state_dict())
    if args.tie_word_embeddings:
        expected.discard("lm_head.weight")
    given = {k for k in state if not _IGNORED_KEYS.match(k) and not (args.tie_word_embeddings and k == "lm_head.weight")}
    unknown = sorted(given - expected)
    missing = sorted(k for k in expected - given if ".core." not in k)
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown keys {_few(unknown)}")
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        raise LongcptError(
            f"{source or 'state dict'}: weights do not match a {args.architecture} with this config: "
            + "; ".join(parts)
        )
    return given, expected - given


def _fill_partitioned(model: CausalLM, state: Mapping[str, torch.Tensor], given: set[str], source: str) -> None:
    """Copy `state` into a model whose parameters are ZeRO-3 partitions, one module at a time.

    For each module, `GatheredParameters(..., modifier_rank=0)` assembles its full parameters on
    every rank, rank 0 copies the stored tensors in (reading them only now), and leaving the
    context broadcasts rank 0's values and re-partitions (transformers'
    `_load_state_dict_into_zero3_model` does the same). Peak memory per rank: its partition plus
    the largest module. Loading without the gather would copy into the empty local shards
    (Lightning#19259: "size mismatch ... torch.Size([0])").

    Every rank checks the shapes first (from the file headers), so a bad file fails on all ranks
    together instead of leaving the others waiting for rank 0. A read that fails on rank 0 (an I/O
    error, a corrupt tensor) is sent to every rank once the module's broadcast is done, and every
    rank raises with rank 0's message: the others would otherwise wait in the next gather until
    the collective timeout.

    Raises:
        LongcptError: shapes that do not fit, or rank 0 failing to read a tensor (on every rank).
    """
    import deepspeed
    import torch.distributed as dist

    shape_of = state.shape if isinstance(state, WeightFiles) else (lambda k: tuple(state[k].shape))
    params = dict(model.named_parameters())  # a tied LM head appears once, as the embedding
    wrong = [f"{k}: stored {shape_of(k)}, model {tuple(params[k].ds_shape)}"
             for k in sorted(given & params.keys()) if shape_of(k) != tuple(params[k].ds_shape)]
    if wrong:
        raise LongcptError(f"{source or 'state dict'}: tensor shapes do not fit the model: {_few(wrong)}")
    filler = dist.get_rank() == 0
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if id(p) not in seen}
        if not own:
            continue
        seen.update(id(p) for p in own.values())
        keys = {n: f"{prefix}.{n}" if prefix else n for n in own}
        failure: list[str | None] = [None]
        with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=0), torch.no_grad():
            if filler:
                failure[0] = _fill_module(module, own, keys, state, given)
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise LongcptError(f"{source or 'state dict'}: rank 0 could not read {failure[0]}; every rank stops")


def _fill_module(module, own: dict, keys: dict[str, str], state: Mapping[str, torch.Tensor], given: set[str]):
    """Rank 0's copy of one module's stored tensors (or kind-new parameters' init); None when it
    worked, else "NAME (ERROR)" for the tensor whose read failed (the caller tells every rank)."""
    for n, p in own.items():
        if keys[n] in given:
            try:
                p.copy_(state[keys[n]])
            except Exception as e:  # noqa: BLE001  (any failure must reach the other ranks, not hang them)
                return f"{keys[n]} ({type(e).__name__}: {e})"
    if any(keys[n] not in given for n in own):  # the attention kind's own new parameters
        module.reset_parameters()
    return None


def _few(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def read_kind_config(config: dict[str, Any], source: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """A config.json dict as (the source family's config, the kind it was exported as, its options).

    A folder a kind exported with its own model type (`KindExport`) gives that kind and its stored
    options; any other folder is a plain softmax model: (`config`, `DEFAULT_KIND`, {}).
    """
    spec = exported_kind(config)
    if spec is None:
        return config, DEFAULT_KIND, {}
    base, options = spec.hooks.export.read_config(config, source)
    return base, spec.name, dict(options or {})


def from_pretrained(
    path: str | os.PathLike,
    attention: str | None = None,
    dtype: torch.dtype | str | None = None,
    rope_precision: str = "fp32",
    rope_theta: float | None = None,
    rope_scaling: dict[str, Any] | None = None,
    partitioned: bool = False,
    **attention_options: Any,
) -> CausalLM:
    """Load an HF folder as a longcpt model (`folder_args`, then `load_pretrained`).

    Args:
        path: folder with `config.json` and weights.
        attention: attention kind (`longcpt.model.attention.KINDS`); default: the kind a folder
            was exported as, with its stored options (a kind with its own export, e.g. Infini),
            else `DEFAULT_KIND` (a plain softmax model).
        dtype: parameter dtype (torch dtype or "fp32"/"bf16"/"fp16"); default: as stored.
        rope_precision: "fp32" (the BF16 RoPE fix) or "model" (transformers' path).
        rope_theta, rope_scaling: context-extension overrides (ABF / an HF rope_scaling dict,
            checked like config.json's: e.g. {"rope_type": "dynamic", "factor": 2.0}).
        partitioned: called inside `deepspeed.zero.Init` (ZeRO-3 training): each rank keeps only
            its partition and rank 0 reads the files one tensor at a time (`build_model`); `dtype`
            is then the context's.
        **attention_options: options of the attention kind by their recipe names
            (e.g. segment_len=2048, memory_update="delta").

    Raises:
        LongcptError: missing files, unsupported architecture, mismatching weights.
    """
    args = folder_args(path, attention, rope_precision, rope_theta, rope_scaling, **attention_options)
    return load_pretrained(path, args, dtype, partitioned)


def folder_args(
    path: str | os.PathLike,
    attention: str | None = None,
    rope_precision: str = "fp32",
    rope_theta: float | None = None,
    rope_scaling: dict[str, Any] | None = None,
    **attention_options: Any,
) -> ModelArgs:
    """The `ModelArgs` of an HF folder run as `attention` (see `from_pretrained`), reading no weights.

    Raises:
        LongcptError: no readable config.json, an unsupported architecture, a bad RoPE override, or
            an inference-time memory asked of a model whose attention is its own.
    """
    path = Path(path)
    source = str(path / "config.json")
    config, stored, stored_options = read_kind_config(read_config(path), source)
    attention = attention or stored
    problem = switch_problem(stored, attention)
    if problem is not None:
        raise LongcptError(f"{path}: {problem}")
    options = {**stored_options, **attention_options} if attention == stored else attention_options
    architecture = ModelArgs.from_hf_config(config, source=source).with_rope(rope_theta, rope_scaling)
    return architecture.run_as(attention, options, rope_precision)


def load_pretrained(
    path: str | os.PathLike, args: ModelArgs, dtype: torch.dtype | str | None = None, partitioned: bool = False
) -> CausalLM:
    """`CausalLM(args)` with the weights of the HF folder at `path` (`args` from `folder_args`).

    Loaded as another kind than the folder's own, the folder kind's own parameters are left out
    (an Infini export run without its memory).

    Raises:
        LongcptError: missing or mismatching weights.
    """
    path = Path(path)
    _, stored, _ = read_kind_config(read_config(path), str(path / "config.json"))
    weights = WeightFiles(path, whole_files=not partitioned)
    if args.attention != stored:  # e.g. an Infini export run without its memory: its own parameters stay out
        weights.drop(k for k in list(weights) if kind_spec(stored).own_parameter(k))
    model = build_model(args, weights, source=str(path), partitioned=partitioned)
    if partitioned:  # DeepSpeed's zero.Init decided the dtype of the partitions
        return model
    stored_dtype = args.hf_config.get("dtype") or args.hf_config.get("torch_dtype")
    target = _as_dtype(dtype) if dtype is not None else _as_dtype(stored_dtype) if stored_dtype else None
    return model.to(target) if target is not None else model


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {**DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise LongcptError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return names[dtype]
