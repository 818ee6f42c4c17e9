"""`torch.save` files read and written one tensor at a time.

Megatron's legacy checkpoints are one `torch.save` pickle per rank (`model_optim_rng.pt`): a zip
archive with the pickled structure in `data.pkl` and each tensor storage in its own record
`data/<key>`. `torch.load` and `torch.save` hold every storage of a file in memory at once; here:

- `TorchFileReader` unpickles the structure with every tensor replaced by a `TensorRef` (key,
  dtype, offset, shape, stride) and reads one storage record on demand (`materialize`). The
  structure is read through `safe_pickle`'s allow-list (CHECKPOINT) unless the caller trusts the file;
  the archive's members and every tensor record are checked against what the file holds first
  (`safe_pickle.archive_sizes`, `storage_record`, `check_tensor_record`).
- `write_torch_file` pickles a structure whose tensors may be `PendingTensor`s (shape, dtype and a
  function that produces the data); each storage is produced, written and dropped in turn.

Files written here load with plain `torch.load` (same records, same rebuild functions), and
`TorchFileReader` reads files written by `torch.save`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import pickle
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import serialization

from megatron_switch.checkpoint.safe_pickle import (
    CHECKPOINT,
    AllowList,
    ArchiveError,
    CheckpointCodeError,
    StorageRecord,
    Unpickler,
    archive_sizes,
    storage_record,
    tensor_builders,
)


class TorchFileError(ValueError):
    """A file that is not a complete `torch.save` archive; the message names it."""


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor stored in a `torch.save` archive, not yet read."""

    key: str
    dtype: torch.dtype
    storage_numel: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _RefUnpickler(Unpickler):
    """Unpickles a `torch.save` structure through the allow-list, leaving tensors as `TensorRef`s,
    each checked against its storage and each storage against the archive's member `sizes`."""

    def __init__(self, file, *, sizes: dict[str, int], **kwargs):
        super().__init__(file, **kwargs)
        self.sizes = sizes
        self.builders = tensor_builders(
            lambda storage, offset, size, stride: TensorRef(storage.key, storage.dtype, storage.numel, offset, size,
                                                            stride), self.what)

    def find_class(self, module: str, name: str):
        found = super().find_class(module, name)  # refuses what is not allowed
        return self.builders.get((module, name), found)

    def persistent_load(self, saved_id) -> StorageRecord:
        return storage_record(saved_id, self.sizes, self.what)


_WHOLE = object()


class TorchFileReader:
    """The structure of one `torch.save` file, with its tensors read one at a time.

    `structure` is the unpickled object with `TensorRef`s in place of tensors, read through the
    allow-list (`allowed`; a checkpoint's by default) unless `trusted`. Raises CheckpointCodeError
    for a global off the list (nothing of the file has run then), TorchFileError for a truncated or
    foreign file.
    """

    def __init__(self, path: str, *, trusted: bool = False, allowed: AllowList = CHECKPOINT):
        self.path = path
        try:
            self._file = open(path, "rb")  # noqa: SIM115  (kept open for reads; closed by close())
            sizes = archive_sizes(self._file, path)
            self._zip = torch._C.PyTorchFileReader(self._file)
            self.structure = _RefUnpickler(io.BytesIO(self._zip.get_record("data.pkl")), sizes=sizes, trusted=trusted,
                                           what=path, allowed=allowed).load()
        except ArchiveError as err:
            self.close()
            raise TorchFileError(str(err)) from None
        except (FileNotFoundError, CheckpointCodeError):
            self.close()
            raise
        except Exception as err:  # noqa: BLE001  (miniz and pickle raise several types for a damaged archive)
            self.close()
            raise TorchFileError(f"{path} is not a complete torch.save archive ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}); it may be truncated "
                                 f"or corrupt") from None

    def materialize(self, ref: TensorRef) -> torch.Tensor:
        """The tensor behind `ref`, read from its record (memory: that one storage)."""
        element = torch.empty((), dtype=ref.dtype).element_size()
        try:
            storage = self._zip.get_storage_from_record(
                f"data/{ref.key}", ref.storage_numel * element, torch.UntypedStorage)._typed_storage()._untyped_storage
        except Exception as err:  # noqa: BLE001
            raise TorchFileError(f"{self.path}: storage record data/{ref.key} cannot be read "
                                 f"({type(err).__name__}); the file may be truncated or corrupt") from None
        return torch.empty(0, dtype=ref.dtype).set_(storage, ref.offset, ref.shape, ref.stride)

    def load_all(self, value: Any = _WHOLE) -> Any:
        """`value` (default: the whole structure) with every TensorRef read: for small parts."""
        value = self.structure if value is _WHOLE else value
        if isinstance(value, TensorRef):
            return self.materialize(value)
        if isinstance(value, dict):
            return {k: self.load_all(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.load_all(v) for v in value)
        return value

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TorchFileReader:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PendingTensor:
    """A tensor to be written by `write_torch_file`: `produce()` returns it (contiguous, CPU)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, produce: Callable[[], torch.Tensor]):
        self.shape, self.dtype, self.produce = tuple(shape), dtype, produce
        self.storage = _PendingStorage(self)

    def __reduce_ex__(self, protocol):
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False,
                                                collections.OrderedDict())


class _PendingStorage:
    def __init__(self, tensor: PendingTensor):
        self.tensor = tensor


def _storage_type(dtype: torch.dtype):
    return getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])


def write_torch_file(path: str, structure: Any) -> None:
    """`torch.save(structure, path)`, with PendingTensors produced and written one at a time.

    Plain tensors in `structure` are written as torch.save writes them.
    """
    pending: dict[str, Any] = {}
    ids: dict[int, str] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _PendingStorage):
                key = ids.setdefault(id(obj), str(len(ids)))
                pending[key] = obj
                return ("storage", _storage_type(obj.tensor.dtype), key, "cpu", math.prod(obj.tensor.shape))
            if isinstance(obj, torch.storage.TypedStorage):
                key = ids.setdefault(obj._untyped_storage._cdata, str(len(ids)))
                pending[key] = obj
                return ("storage", _storage_type(obj.dtype), key, "cpu", obj._size())
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(structure)
    data = buffer.getvalue()
    with serialization._open_zipfile_writer(path) as zip_file:
        zip_file.write_record("data.pkl", data, len(data))
        zip_file.write_record(".format_version", "1", 1)
        alignment = str(serialization._get_storage_alignment())
        zip_file.write_record(".storage_alignment", alignment, len(alignment))
        zip_file.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for key in sorted(pending, key=int):
            obj = pending.pop(key)
            if isinstance(obj, _PendingStorage):
                spec = obj.tensor
                tensor = spec.produce()
                if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                    raise AssertionError(f"{path}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                                         f"declared {spec.shape} {spec.dtype}")
                storage = tensor.contiguous().untyped_storage()
                if storage.nbytes() != tensor.numel() * tensor.element_size():
                    storage = tensor.clone().untyped_storage()
            else:
                storage = obj._untyped_storage
            zip_file.write_record(f"data/{key}", storage, storage.nbytes())
            del storage
