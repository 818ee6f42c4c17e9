"""One consolidated safetensors checkpoint: full logical tensors, layout-free, plus a JSON index.

Directory contents:
  model.safetensors              every model tensor under its torch_dist key
  optimizer.safetensors          Adam moments and float32 master weights (omitted with --no-optim)
  objects.safetensors            tensors inside the objects (e.g. Transformer Engine's `_extra_state`),
                                 when there are any
  model.safetensors.index.json   {"metadata": {...}, "weight_map": {name: file}} (Hugging Face's
                                 index layout); metadata: format, version, iteration, layout (the one it
                                 came from, for reference), model_config, common (scheduler, optimizer
                                 hyper-parameters, progress), objects (`_extra_state` entries)
The index holds no pickle: objects are JSON (version 2), plain JSON values as they are, other values
tagged {"__type__": ...}: tuples, dicts with other than string keys, argparse Namespaces (as a
dict), enums (by class and member name; the class must be on `safe_pickle`'s allow-list), torch
dtypes, tensors (by name in objects.safetensors) and Transformer Engine 1.x states (a torch.save
archive in a BytesIO: its contents, saved again on reading). Folders of version 1 (no version field)
kept objects as base64 torch.save pickles: they are still read, through `safe_pickle`'s allow-list.
Files are written tensor by tensor (the safetensors layout: 8-byte header size, JSON header, data)
and read block by block through `safetensors.safe_open`, reopened for every read so that the
memory-mapped pages of one tensor are released before the next is read.
"""

from __future__ import annotations

import argparse
import base64
import enum
import io
import json
import os
import struct
from collections.abc import Callable
from typing import Any

import torch

from megatron_switch.checkpoint.contents import (
    CheckpointReader,
    ConvertError,
    Index,
    TensorSpec,
    full_index,
    is_optimizer,
)
from megatron_switch.checkpoint.layout import CheckpointError, inside
from megatron_switch.checkpoint.safe_pickle import CHECKPOINT, CheckpointCodeError, allowed_object, load

INDEX = "model.safetensors.index.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OBJECTS_FILE = "objects.safetensors"
FORMAT = "megatron-switch"
VERSION = 2  # 1 (no "version" field): objects as base64 torch.save pickles
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
_TAG = "__type__"


def is_consolidated_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX))


class _ObjectEncoder:
    """Objects to JSON; the tensors they hold are collected in `tensors` (for objects.safetensors)."""

    def __init__(self, trusted: bool):
        self.trusted = trusted
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self.encode(v, f"{where}/{i}") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {_TAG: "tuple", "items": [self.encode(v, f"{where}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and _TAG not in value:
                return {k: self.encode(v, f"{where}/{k}") for k, v in value.items()}
            return {_TAG: "dict", "items": [[self.encode(k, f"{where}/{k}"), self.encode(v, f"{where}/{k}")]
                                            for k, v in value.items()]}
        if isinstance(value, argparse.Namespace):
            return {_TAG: "namespace", "items": self.encode(vars(value), where)}
        if isinstance(value, enum.Enum):
            cls = type(value)
            return {_TAG: "enum", "module": cls.__module__, "class": cls.__qualname__, "member": value.name}
        if isinstance(value, torch.dtype):
            return {_TAG: "dtype", "name": str(value).removeprefix("torch.")}
        if isinstance(value, torch.Tensor):
            if value.dtype not in _CODES:
                raise ConvertError(f"object {where}: a {value.dtype} tensor, which safetensors files here do not "
                                   f"hold; convert to torch or torch_dist instead")
            self.tensors[where] = value.detach().cpu().contiguous()
            return {_TAG: "tensor", "name": where}
        if isinstance(value, io.BytesIO):  # Transformer Engine 1.x: a torch.save archive of its state
            state = load(value.getvalue(), trusted=self.trusted, what=f"object {where}")
            return {_TAG: "torch_save", "value": self.encode(state, where)}
        raise ConvertError(f"object {where}: a {type(value).__module__}.{type(value).__qualname__}, which the "
                           f"consolidated format (JSON and tensors) cannot hold; convert to torch or torch_dist")


def _decode(value: Any, tensor: Callable[[str], torch.Tensor], where: str) -> Any:
    """The object `value` (JSON written by _ObjectEncoder) stands for; `tensor(name)` reads one tensor."""
    if isinstance(value, list):
        return [_decode(v, tensor, where) for v in value]
    if not isinstance(value, dict):
        return value
    if _TAG not in value:
        return {k: _decode(v, tensor, where) for k, v in value.items()}
    kind = value[_TAG]
    if kind == "tuple":
        return tuple(_decode(v, tensor, where) for v in value["items"])
    if kind == "dict":
        return {_decode(k, tensor, where): _decode(v, tensor, where) for k, v in value["items"]}
    if kind == "namespace":
        return argparse.Namespace(**_decode(value["items"], tensor, where))
    if kind == "enum":
        cls = allowed_object((value["module"], value["class"]), CHECKPOINT)
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
            raise CheckpointCodeError(f"{where}: names {value['module']}.{value['class']} as an enum, which is not "
                                      f"an enum class on the allow-list of checkpoint contents (an index written "
                                      f"by megatron-switch names none other): the index was edited")
        return cls[value["member"]]
    if kind == "dtype":
        dtype = getattr(torch, value["name"], None)
        if not isinstance(dtype, torch.dtype):
            raise ConvertError(f"{where}: {value['name']!r} is not a torch dtype")
        return dtype
    if kind == "tensor":
        return tensor(value["name"])
    if kind == "torch_save":
        data = io.BytesIO()
        torch.save(_decode(value["value"], tensor, where), data)
        data.seek(0)
        return data
    raise ConvertError(f"{where}: unknown object type {kind!r} (written by a newer megatron-switch?)")


def _jsonable(value: Any) -> Any:
    """The common state as plain JSON: tensors as numbers, arguments as a dict, enums as names."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # paths and the like in Megatron-LM's args


class ConsolidatedReader(CheckpointReader):
    format_name = "safetensors"

    def __init__(self, path: str, *, trusted: bool = False):
        super().__init__(path, trusted=trusted)
        from safetensors import safe_open

        try:
            with open(inside(path, INDEX, f"{path}: the index")) as f:
                index = json.load(f)
            meta = index["metadata"]
            if meta.get("format") != FORMAT:
                raise ConvertError(f"{path}/{INDEX}: not a megatron-switch checkpoint index (format "
                                   f"{meta.get('format')!r})")
            version = meta.get("version", 1)
            if not isinstance(version, int) or version > VERSION:
                raise ConvertError(f"{path}/{INDEX}: format version {version!r}, newer than this megatron-switch "
                                   f"reads ({VERSION}): upgrade megatron-switch")
            self._where = index["weight_map"]
            files = {}
            for name, file in self._where.items():  # every file checked before any is opened
                if not (isinstance(file, str) and file in files):
                    files[file] = inside(path, file, f"{path}/{INDEX}: the weight_map entry of {name}")
            for file in sorted(files):
                with safe_open(files[file], framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                        view = handle.get_slice(name)
                        self.tensors[name] = TensorSpec(tuple(view.get_shape()), _DTYPES[view.get_dtype()])
        except CheckpointError:  # ConvertError, or a file outside the folder: named already
            raise
        except FileNotFoundError as err:
            raise ConvertError(f"{path}: {err.filename} is missing") from None
        except Exception as err:  # noqa: BLE001  (json, safetensors raise several types)
            raise ConvertError(f"{path}: cannot be opened ({type(err).__name__}: {err}); a file is truncated "
                               f"or corrupt") from None
        missing = sorted(set(self._where) - set(self.tensors))
        if missing:
            raise ConvertError(f"{path}: {INDEX} lists {len(missing)} tensors the files do not hold "
                               f"({', '.join(missing[:3])}...)")
        self.common = meta["common"]
        objects = meta.get("objects", {})
        where = f"{path}/{INDEX}"
        if version == 1:  # base64 torch.save pickles
            self.objects = {k: load(base64.b64decode(v), trusted=trusted, what=f"{where}: objects[{k!r}]")
                            for k, v in objects.items()}
        else:
            try:
                self.objects = {k: _decode(v, self._object_tensor, f"{where}: objects[{k!r}]")
                                for k, v in objects.items()}
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise ConvertError(f"{where}: malformed objects ({type(err).__name__}: {err}); the index was "
                                   f"edited or not written by megatron-switch") from None

    def _object_tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        try:
            with safe_open(inside(self.path, OBJECTS_FILE, f"{self.path}: the objects' tensors"),
                           framework="pt") as handle:
                return handle.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ConvertError(f"{self.path}: object tensor {name} cannot be read from {OBJECTS_FILE} "
                               f"({type(err).__name__}: {err})") from None

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        spec = self.tensors[name]
        index = index or full_index(spec.shape)
        from safetensors import safe_open

        try:  # opened per read: the file's memory map (and its resident pages) goes with the handle
            with safe_open(os.path.join(self.path, self._where[name]), framework="pt") as handle:
                tensor = handle.get_slice(name)[tuple(slice(a, b) for a, b in index)]
        except Exception as err:  # noqa: BLE001
            raise ConvertError(f"{self.path}: {name} cannot be read ({type(err).__name__}: {err})") from None
        return tensor.contiguous()


def safetensors_header(specs: list[tuple[str, TensorSpec]]) -> bytes:
    """The bytes a safetensors file of `specs` ((name, spec) each, stored in that order) starts with:
    the header's length, then the JSON header (padded to 8 bytes); the tensors' data follow it."""
    header, offset = {}, 0
    for name, spec in specs:
        header[name] = {"dtype": _CODES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors_file(path: str, tensors: list[tuple[str, TensorSpec, Callable[[], torch.Tensor]]],
                           progress) -> None:
    """A safetensors file of `tensors` ((name, spec, produce) each), produced and written one at a time
    (safetensors' own `save_file` takes every tensor at once)."""
    with open(path, "wb") as f:
        f.write(safetensors_header([(name, spec) for name, spec, _ in tensors]))
        for _, _, produce in tensors:
            tensor = produce()
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            if progress is not None:
                progress.update(tensor.numel() * tensor.element_size())
            del tensor
        f.flush()
        os.fsync(f.fileno())


def write_consolidated(path: str, source: CheckpointReader, names, common: dict, progress) -> None:
    """Write `names` of `source` (and its objects) to the new directory `path` as consolidated safetensors."""
    encoder = _ObjectEncoder(source.trusted)
    objects = {k: encoder.encode(v, k) for k, v in source.objects.items()}
    os.makedirs(path)
    files = {MODEL_FILE: [n for n in names if not is_optimizer(n)],
             OPTIMIZER_FILE: [n for n in names if is_optimizer(n)]}
    weight_map = {}
    for file, members in files.items():
        if members:
            write_safetensors_file(os.path.join(path, file),
                        [(n, source.tensors[n], lambda n=n: source.read(n)) for n in members], progress)
            weight_map.update(dict.fromkeys(members, file))
    if encoder.tensors:
        write_safetensors_file(os.path.join(path, OBJECTS_FILE),
                    [(n, TensorSpec(tuple(t.shape), t.dtype), lambda t=t: t) for n, t in encoder.tensors.items()],
                    None)
    metadata = {"format": FORMAT, "version": VERSION, "iteration": common.get("iteration"),
                "layout": common.get("layout"), "model_config": common.get("model_config"),
                "common": _jsonable(common), "objects": objects}
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": metadata, "weight_map": weight_map}, f, indent=1)
