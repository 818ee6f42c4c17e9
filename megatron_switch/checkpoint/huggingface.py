"""Hugging Face `SwitchTransformersSparseMLP` weights <-> a `SwitchMLP`.

Hugging Face keys (per MoE block, under any prefix):
  router.classifier.weight            [E, h]
  experts.expert_{i}.wi.weight        [f, h]        (ReLU/GELU experts)
  experts.expert_{i}.wi_0.weight, .wi_1.weight      (gated experts: act(wi_0 x) * wi_1 x)
  experts.expert_{i}.wo.weight        [h, f]
Hugging Face experts have no biases: importing zeroes ours, exporting refuses non-zero ones.
Under expert parallelism each rank imports or exports its own experts (global indices).
`HuggingFaceFolder` lists a model folder's tensors from the files' headers (safetensors, or
`pytorch_model*.bin` unpickled through `safe_pickle`'s allow-list: a crafted .bin runs no code) and
reads them one at a time; `read_huggingface_weights` reads them all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from megatron_switch.checkpoint.contents import TensorSpec
from megatron_switch.checkpoint.layout import inside
from megatron_switch.layer import SwitchMLP


class WeightMappingError(ValueError):
    """Weights that do not fit the layer; the message names the key and the shapes."""


_INDEX = "{}.index.json"
SAFETENSORS, BIN = "model.safetensors", "pytorch_model.bin"


def cache_blobs(folder: str) -> tuple[str, ...]:
    """Where else the files of model folder `folder` may lie: a Hugging Face download cache keeps each
    file once, in `models--ORG--NAME/blobs/<hash>`, and a revision's folder
    (`models--ORG--NAME/snapshots/<revision>/`) holds symbolic links to them (`../../blobs/<hash>`);
    for such a folder, that repository's blobs folder (nothing else of the cache), else nothing."""
    real = os.path.realpath(folder)
    snapshots = os.path.dirname(real)
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    return (blobs,) if os.path.basename(snapshots) == "snapshots" and os.path.isdir(blobs) else ()


def model_file(folder: str, name: object, record: str) -> str:
    """`folder`/`name` once it is shown to stay in the model folder (or its cache blobs): `layout.inside`."""
    return inside(folder, name, record, also=cache_blobs(folder))


def _weight_files(folder: str, single: str) -> dict[str, list[str]] | None:
    """{file: the tensor names its index gives it (None: no index)} for `single` in `folder`, or for
    the shards its index names; None when neither is there. Every file is checked to lie in the
    folder (`model_file`) before any is opened."""
    if os.path.isfile(os.path.join(folder, single)):
        return {model_file(folder, single, f"{folder}: the weights"): None}
    index = os.path.join(folder, _INDEX.format(single))
    if not os.path.isfile(index):
        return None
    try:
        with open(model_file(folder, _INDEX.format(single), f"{folder}: the weight index")) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise WeightMappingError(f"{index} is not a weight index ({type(err).__name__}: {err})") from None
    for file, names in files.items():
        model_file(folder, file, f"{index}: the weight_map entry of {names[0]}")
    missing = sorted(f for f in files if not os.path.isfile(os.path.join(folder, f)))
    if missing:
        raise WeightMappingError(f"{index} names {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, "
                                 f"not in {folder}: the download is incomplete; fetch the missing shards")
    return {os.path.join(folder, f): names for f, names in sorted(files.items())}


class HuggingFaceFolder:
    """The tensors of a Hugging Face model folder as `save_pretrained` writes it: `model.safetensors`
    (or the shards of its index), else `pytorch_model.bin` (or its shards). Listed from the files'
    headers (`specs`: name -> TensorSpec, `files`: name -> file), checked against the index, and
    read one at a time (`read`): memory is the tensor read. A .bin's pickle is read through
    `safe_pickle`'s allow-list unless `trusted`. Raises WeightMappingError naming the file for a
    missing, truncated or foreign file, or a tensor the index and the files disagree on."""

    def __init__(self, folder: str, *, trusted: bool = False):
        self.folder = folder
        self.trusted = trusted
        self.specs: dict[str, TensorSpec] = {}
        self.files: dict[str, str] = {}
        self._bins: dict = {}
        files = _weight_files(folder, SAFETENSORS)
        self.format = "safetensors" if files is not None else "bin"
        files = files if files is not None else _weight_files(folder, BIN)
        if files is None:
            raise WeightMappingError(f"{folder}: no {SAFETENSORS}, {BIN} or index of either: not a Hugging Face "
                                     "model folder (save_pretrained writes one)")
        for file, indexed in files.items():
            found = self._list(file)
            if indexed is not None and set(indexed) != set(found):
                gone, extra = sorted(set(indexed) - set(found)), sorted(set(found) - set(indexed))
                raise WeightMappingError(f"{file} does not hold what its index says: "
                                         + "; ".join(f"{what}: {', '.join(names[:4])}" for what, names in
                                                     (("missing", gone), ("not in the index", extra)) if names))
            for name, spec in found.items():
                if name in self.files:
                    raise WeightMappingError(f"{name} is in both {self.files[name]} and {file}")
                self.specs[name], self.files[name] = spec, file

    def _list(self, file: str) -> dict[str, TensorSpec]:
        if self.format == "safetensors":
            from safetensors import safe_open

            try:
                with safe_open(file, framework="pt") as handle:
                    return {name: TensorSpec(tuple(handle.get_slice(name).get_shape()),
                                             _SAFETENSORS_DTYPES[handle.get_slice(name).get_dtype()])
                            for name in handle.keys()}
            except Exception as err:  # noqa: BLE001  (safetensors raises several types for a damaged file)
                raise WeightMappingError(f"{file} is not a complete safetensors file ({type(err).__name__}: "
                                         f"{err}); it may be truncated: download it again") from None
        from megatron_switch.checkpoint.safe_pickle import WEIGHTS
        from megatron_switch.checkpoint.torchzip import TensorRef, TorchFileError, TorchFileReader

        try:
            reader = TorchFileReader(file, trusted=self.trusted, allowed=WEIGHTS)
        except TorchFileError as err:
            raise WeightMappingError(str(err)) from None
        self._bins[file] = reader
        state = reader.structure
        if not isinstance(state, Mapping) or not all(isinstance(v, TensorRef) for v in state.values()):
            raise WeightMappingError(f"{file}: not a state dict of tensors")
        return {name: TensorSpec(ref.shape, ref.dtype) for name, ref in state.items()}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name`, or its rows [a, b) (from safetensors, only those are read)."""
        file = self.files[name]
        if self.format == "bin":
            reader = self._bins[file]
            tensor = reader.materialize(reader.structure[name])
            return (tensor if rows is None else tensor[rows[0]:rows[1]]).contiguous().clone()
        from safetensors import safe_open

        try:  # opened for each read: the mapped pages of one tensor go before the next is read
            with safe_open(file, framework="pt") as handle:
                if rows is None:
                    return handle.get_tensor(name)
                return handle.get_slice(name)[rows[0]:rows[1]].contiguous()
        except Exception as err:  # noqa: BLE001
            raise WeightMappingError(f"{file}: {name} cannot be read ({type(err).__name__}: {err})") from None

    def close(self) -> None:
        for reader in self._bins.values():
            reader.close()
        self._bins.clear()


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_huggingface_weights(folder: str, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model folder (see `HuggingFaceFolder`). Raises
    CheckpointCodeError for a .bin naming anything but tensors (unless `trusted`: it then runs)."""
    weights = HuggingFaceFolder(folder, trusted=trusted)
    try:
        return {name: weights.read(name) for name in weights.specs}
    finally:
        weights.close()


def _take(state: Mapping[str, torch.Tensor], key: str, shape) -> torch.Tensor:
    if key not in state:
        raise WeightMappingError(f"missing key {key!r} in the Hugging Face state dict")
    tensor = state[key]
    if tuple(tensor.shape) != tuple(shape):
        raise WeightMappingError(f"{key}: shape {tuple(tensor.shape)}, the Switch layer needs {tuple(shape)}")
    return tensor


def import_huggingface_sparse_mlp(layer: SwitchMLP, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy a Hugging Face MoE block's router and this rank's experts into `layer` (any bank type:
    through the bank's `load_expert_weights`)."""
    experts, switch = layer.experts, layer.switch
    hidden, ffn = layer.router.weight.shape[1], experts.ffn
    with torch.no_grad():
        layer.router.weight.copy_(_take(state, f"{prefix}router.classifier.weight", (switch.num_experts, hidden)))
    for local in range(experts.num_local_experts):
        base = f"{prefix}experts.expert_{experts.first_expert + local}."
        if switch.gated:
            w1 = torch.cat([_take(state, base + "wi_0.weight", (ffn, hidden)),
                            _take(state, base + "wi_1.weight", (ffn, hidden))])
        else:
            w1 = _take(state, base + "wi.weight", (ffn, hidden))
        weights = {"weight1": w1, "weight2": _take(state, base + "wo.weight", (hidden, ffn))}
        if switch.expert_bias:
            weights.update(bias1=torch.zeros(experts.fc1_out), bias2=torch.zeros(hidden))
        experts.load_expert_weights(local, weights)


def export_huggingface_sparse_mlp(layer: SwitchMLP, prefix: str = "") -> dict[str, torch.Tensor]:
    """This rank's part of `layer` under Hugging Face's keys (the router on every rank)."""
    experts, switch = layer.experts, layer.switch
    state = {f"{prefix}router.classifier.weight": layer.router.weight.detach().clone()}
    for local in range(experts.num_local_experts):
        weights = experts.expert_weights(local)
        for name in ("bias1", "bias2"):
            if name in weights and torch.count_nonzero(weights[name]):
                raise WeightMappingError("Hugging Face Switch experts have no biases, and this layer's are "
                                         "non-zero: train with --switch-no-expert-bias to export")
        base = f"{prefix}experts.expert_{experts.first_expert + local}."
        if switch.gated:
            state[base + "wi_0.weight"], state[base + "wi_1.weight"] = weights["weight1"].chunk(2)
        else:
            state[base + "wi.weight"] = weights["weight1"]
        state[base + "wo.weight"] = weights["weight2"]
    return state
