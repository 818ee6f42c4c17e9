"""One consolidated safetensors checkpoint: full logical tensors, layout-free, plus a JSON index.

Directory contents:
  model.safetensors              every model tensor under its torch_dist key
  optimizer.safetensors          Adam moments and float32 master weights (omitted with --no-optim)
  model.safetensors.index.json   {"metadata": {...}, "weight_map": {name: file}} (Hugging Face's
                                 index layout); metadata: format, iteration, layout (the one it came
                                 from, for reference), model_config, common (scheduler, optimizer
                                 hyper-parameters, progress), objects (`_extra_state` entries)
Files are written tensor by tensor (the safetensors layout: 8-byte header size, JSON header, data)
and read block by block through `safetensors.safe_open`, reopened for every read so that the
memory-mapped pages of one tensor are released before the next is read.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
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

INDEX = "model.safetensors.index.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = "megatron-switch"
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def is_consolidated_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX))


def _encode_object(value: Any) -> str:
    data = io.BytesIO()
    torch.save(value, data)
    return base64.b64encode(data.getvalue()).decode()


def _decode_object(text: str) -> Any:
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


class ConsolidatedReader(CheckpointReader):
    format_name = "safetensors"

    def __init__(self, path: str):
        super().__init__(path)
        from safetensors import safe_open

        try:
            with open(os.path.join(path, INDEX)) as f:
                index = json.load(f)
            meta = index["metadata"]
            if meta.get("format") != FORMAT:
                raise ConvertError(f"{path}/{INDEX}: not a megatron-switch checkpoint index (format "
                                   f"{meta.get('format')!r})")
            self._where = index["weight_map"]
            for file in sorted(set(self._where.values())):
                with safe_open(os.path.join(path, file), framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                        view = handle.get_slice(name)
                        self.tensors[name] = TensorSpec(tuple(view.get_shape()), _DTYPES[view.get_dtype()])
        except ConvertError:
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
        self.objects = {k: _decode_object(v) for k, v in meta.get("objects", {}).items()}

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


def _write_file(path: str, source: CheckpointReader, names, progress) -> None:
    header, offset = {}, 0
    for name in names:
        spec = source.tensors[name]
        header[name] = {"dtype": _CODES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in names:
            tensor = source.read(name)
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            progress.update(tensor.numel() * tensor.element_size())
            del tensor
        f.flush()
        os.fsync(f.fileno())


def write_consolidated(path: str, source: CheckpointReader, names, common: dict, progress) -> None:
    """Write `names` of `source` to the new directory `path` as consolidated safetensors."""
    os.makedirs(path)
    files = {MODEL_FILE: [n for n in names if not is_optimizer(n)],
             OPTIMIZER_FILE: [n for n in names if is_optimizer(n)]}
    weight_map = {}
    for file, members in files.items():
        if members:
            _write_file(os.path.join(path, file), source, members, progress)
            weight_map.update(dict.fromkeys(members, file))
    metadata = {"format": FORMAT, "iteration": common.get("iteration"), "layout": common.get("layout"),
                "model_config": common.get("model_config"), "common": _jsonable(common),
                "objects": {k: _encode_object(v) for k, v in source.objects.items()}}
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": metadata, "weight_map": weight_map}, f, indent=1)
