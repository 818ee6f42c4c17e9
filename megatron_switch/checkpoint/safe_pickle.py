"""Every pickle a checkpoint holds is read here, through an allow-list: opening a checkpoint never runs
code from it.

A pickle names the functions and classes it calls when it is read (GLOBAL / STACK_GLOBAL opcodes);
a crafted one names `os.system` or `builtins.open`. Here each kind of pickle may name only the
globals the checkpoints that hold it really contain (found by reading files written by this project's
trainer, `--bf16`, `--use-distributed-optimizer`, and `megatron-switch convert` into every format,
plus what Megatron-LM stores, as megatron-core's own `safe_globals.py` declares it). Any other global
raises `CheckpointCodeError` naming it and the file; `trusted=True` (the `--trust-checkpoint-code`
flag of `train` and `convert`) restores plain unpickling for a checkpoint whose source the user trusts.

- `Unpickler`: `pickle.Unpickler` that resolves only allow-listed globals (the streaming reader of
  legacy files, `torchzip`, builds on it; torch_dist's `.metadata` is read with it).
- `load`: `torch.load` of a file or bytes: the pickle is first read with `Unpickler` without building
  any tensor (so the allow-list is exact: not torch's own weights-only list, which megatron-core widens
  at import), then loaded by `torch.load(weights_only=True)` allowed exactly the globals it named.
- `WEIGHTS`: the allow-list of a Hugging Face `pytorch_model*.bin` (tensors only).
- `check_extra_state`: Transformer Engine's FP8 `_extra_state`, a pickle in a byte tensor that
  Transformer Engine before 2.18 unpickles without restriction when a model loads it.
- What a torch.save archive can hold, checked before anything is inflated or allocated (also for a
  trusted file): `archive_sizes` (every zip member inside the file, no more inflated than its
  compression can produce, data.pkl at most PICKLE_LIMIT), `storage_record` (a storage's recorded
  elements are exactly its member's bytes) and `check_tensor_record` (a tensor's size, offset and
  stride inside its storage): the one check of each, for the trainer (`load`) and convert (`torchzip`).

Where they are used: legacy rank files (`legacy` through `torchzip`, the trainer's legacy load),
torch_dist (`distcp`: `.metadata`, the common state, objects; the trainer's torch_dist load),
consolidated indexes of format 1 (`consolidated`), Hugging Face weights (`huggingface` through
`torchzip`, with `WEIGHTS`).
Pickles read elsewhere: the tensor records inside torch_dist's `.distcp` files, which torch's
checkpoint reader loads with `torch.load(weights_only=True)` (torch's weights-only list, which
megatron-core extends with its own classes at import).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import io
import os
import pickle
import warnings
import zipfile
from typing import Any, BinaryIO

import torch

from megatron_switch.checkpoint.contents import ConvertError

TRUST_FLAG = "--trust-checkpoint-code"

Global = tuple[str, str]  # (module, name) as the pickle spells it


@dataclasses.dataclass(frozen=True)
class AllowList:
    """The globals one kind of pickle may name; `holders` says which files those are (for messages)."""

    holders: str
    names: frozenset[Global]

    def __contains__(self, key: Global) -> bool:
        return key in self.names


# --- the globals, in groups; each entry says which checkpoint holds it ---------------------------------

# Tensors, as torch.save writes them (every checkpoint file; a Hugging Face pytorch_model.bin).
_TENSORS = frozenset({
    ("torch._utils", "_rebuild_tensor_v2"),  # every tensor
    ("collections", "OrderedDict"),  # every tensor's (empty) backward hooks; torch's state dicts
    ("torch._tensor", "_rebuild_from_type_v2"),  # a tensor with Python attributes: Megatron-LM's float32
    ("torch", "Tensor"),  # master weights (fp32_from_fp16_params) carry tensor_model_parallel & co.
    ("torch._utils", "_rebuild_parameter"),  # a Parameter saved in place of a tensor (keep_vars=True)
    ("torch._utils", "_rebuild_parameter_with_state"),  # the same, with Python attributes
    ("_codecs", "encode"),  # bytes under pickle protocol 2 (torch.save's): numpy arrays' data
    # the storage type of each tensor record (the pickle's persistent ids), for the dtypes below
    *(("torch", f"{kind}Storage") for kind in (
        "Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")),
    ("torch.storage", "UntypedStorage"),
})

# torch dtypes (those the formats here hold): Megatron-LM's args (params_dtype, main_grads_dtype,
# exp_avg_dtype, ...; torch.uint8 stands for fp8 there), torch_dist's .metadata (each tensor's dtype).
_DTYPES = frozenset(("torch", name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"))

# Megatron-LM's checkpoints, beyond tensors: the `args` Namespace of every legacy file and of the
# torch_dist common state (ours hold a Namespace of plain values), Megatron-LM's RNG states and rerun
# state machine. The classes are those megatron-core registers with torch for exactly this
# (megatron/core/safe_globals.py); an entry the installed version does not define is refused.
_MEGATRON = frozenset({
    ("argparse", "Namespace"),  # `args` (ours and Megatron-LM's)
    ("types", "SimpleNamespace"),  # Megatron-LM args (heterogeneous layer configs)
    ("pathlib", "PosixPath"),  # Megatron-LM args that are paths
    ("signal", "Signals"),  # Megatron-LM args.exit_signal
    ("megatron.core.enums", "ModelType"),  # Megatron-LM args.model_type
    ("megatron.core.transformer.enums", "AttnBackend"),  # Megatron-LM args.attention_backend
    ("megatron.core.transformer.enums", "CudaGraphScope"),  # Megatron-LM args.cuda_graph_scope
    ("megatron.core.transformer.enums", "CudaGraphModule"),  # the same, newer megatron-core
    ("megatron.core.transformer.enums", "InferenceCudaGraphScope"),  # the same, newer megatron-core
    ("megatron.core.optimizer.optimizer_config", "OptimizerConfig"),  # Megatron-LM optimizer state
    ("megatron.core.rerun_state_machine", "RerunState"),  # Megatron-LM rerun state machine
    ("megatron.core.rerun_state_machine", "RerunMode"),
    ("megatron.core.rerun_state_machine", "RerunDiagnostic"),
    ("_io", "BytesIO"),  # Transformer Engine 1.x `_extra_state` (a torch.save archive in a BytesIO)
    ("torch._C", "Generator"),  # Megatron-LM RNG states (newer versions) ...
    ("torch", "device"),  # ... and the device each generator belongs to
})

# numpy.random.get_state() in RNG states: our torch_dist `rng_state` objects, Megatron-LM's rng_state.
_NUMPY_RNG = frozenset({
    ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2 writes this name
    ("numpy.core.multiarray", "_reconstruct"),  # numpy 1 (the same function)
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.dtypes", "UInt32DType"),
})

# torch_dist's `.metadata` (torch.distributed.checkpoint's plan of what each .distcp file holds).
_DCP = "torch.distributed.checkpoint"
_DCP_METADATA = frozenset({
    *((f"{_DCP}.metadata", name) for name in (
        "Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "_MEM_FORMAT_ENCODING")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    *((f"{_DCP}.planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # TensorProperties.layout
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id of a checkpoint written by `convert`
})

# Transformer Engine's FP8 `_extra_state` (TE 2.x: pickle.dumps of {"recipe", "scale_fwd",
# "amax_history_fwd", ..., "extra_fp8_variables"}): its recipe, as megatron-core's own restricted
# reader of these states allows them (megatron/core/safe_globals.py, SafeUnpickler, core_v0.19).
_TE = "transformer_engine.common.recipe"
_TE_RECIPE = frozenset({
    *((_TE, name) for name in ("DelayedScaling", "Float8CurrentScaling", "Float8BlockScaling", "MXFP8BlockScaling",
                               "NVFP4BlockScaling", "Format", "_FormatHelper", "MMParams", "QParams")),
    ("megatron.core.extensions.transformer_engine", "TEDelayedScaling"),  # megatron's DelayedScaling
})
# Tensors pickled without torch.save keep each storage as a nested torch.save archive, read by
# torch.storage._load_from_bytes (megatron-core >= 0.19 replaces it with its safe_load_from_bytes at
# import, so pickles written there name that); a screen reads the nested archive with WEIGHTS.
_STORAGE_LOADERS = frozenset({("torch.storage", "_load_from_bytes"),
                              ("megatron.core.safe_globals", "safe_load_from_bytes")})

# --- the allow-lists: one per kind of pickle --------------------------------------------------------------

# Checkpoint contents: legacy rank files, the torch_dist common state and objects (rng_state,
# `_extra_state`), the objects of a consolidated index written before format version 2, and
# Transformer Engine 1.x states inside them (tensors and plain values).
CHECKPOINT = AllowList("megatron-switch and Megatron-LM checkpoints", _TENSORS | _DTYPES | _MEGATRON | _NUMPY_RNG)
DCP_METADATA = AllowList("torch_dist metadata files", _DCP_METADATA | _DTYPES)
WEIGHTS = AllowList("weight files (tensors only)", _TENSORS)
TE_EXTRA_STATE = AllowList("Transformer Engine FP8 states", _TENSORS | _TE_RECIPE | _STORAGE_LOADERS)


class CheckpointCodeError(ConvertError):
    """A checkpoint's pickle names a global off the allow-list; the message names it and the file."""


def _refusal(what: str, key: Global, reason: str) -> CheckpointCodeError:
    return CheckpointCodeError(
        f"{what}: refused to unpickle {key[0]}.{key[1]}, {reason}; a pickle can run any code it names "
        f"when read, so loading stops here. Load checkpoints from sources you trust; to load this one "
        f"anyway, pass {TRUST_FLAG} (only if you trust whoever made it)")


@functools.cache
def _resolve(key: Global) -> Any:
    """The object an allow-listed global names, or None where this environment does not define it."""
    try:
        with warnings.catch_warnings():  # numpy.core is a deprecated alias of numpy._core
            warnings.simplefilter("ignore")
            return getattr(importlib.import_module(key[0]), key[1])
    except (ImportError, AttributeError):
        return None


def allowed_object(key: Global, allowed: AllowList) -> Any:
    """The object `key` names if it is on `allowed` (and defined here), else None."""
    return _resolve(key) if key in allowed else None


class Unpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the globals of `allowed` (any global with `trusted=True`).

    `what` names the pickle in errors (a file, or a file and a key). `found` maps each global the
    pickle named to the object it resolved to.
    """

    def __init__(self, file: BinaryIO, *, trusted: bool, what: str, allowed: AllowList = CHECKPOINT):
        super().__init__(file)
        self.trusted, self.what, self.allowed = trusted, what, allowed
        self.found: dict[Global, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)  # as the pickle spells it (no Python 2 name is on any list)
        if self.trusted:
            found = super().find_class(module, name)
        elif key not in self.allowed:
            raise _refusal(self.what, key, f"which is not among the globals {self.allowed.holders} hold")
        else:
            found = _resolve(key)
            if found is None:
                raise _refusal(self.what, key, "which this environment does not define")
        self.found[key] = found
        return found


# --- what a torch.save archive can hold: its zip members and its tensor records --------------------------

# A pickled structure (data.pkl: names, hyper-parameters, references to tensors), never the tensors
# themselves: Megatron-LM's rank files and Hugging Face's .bin hold a few MB; a larger one is refused
# before it is inflated and unpickled.
PICKLE_LIMIT = 256 << 20
# Deflate never inflates more than 1032:1 (258 bytes from each 2-bit code): a member declaring more lies.
_DEFLATE_RATIO = 1032


class ArchiveError(ConvertError):
    """A torch.save archive whose members or tensor records exceed what the file holds; the message
    names the file, the member or record, and the sizes."""


def archive_sizes(stream: BinaryIO, what: str) -> dict[str, int]:
    """{member name without the archive's folder: declared size} of the torch.save zip `stream`, read
    from its central directory (nothing is inflated), after checking that every member lies inside
    the file, is stored (as torch.save writes them) or deflated to no more than deflate can produce,
    and that `data.pkl` declares at most PICKLE_LIMIT bytes. ArchiveError otherwise."""
    start = stream.tell()
    try:
        end = stream.seek(0, os.SEEK_END) - start
        stream.seek(start)
        infos = zipfile.ZipFile(stream).infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise ArchiveError(f"{what} is not a complete torch.save archive ({type(err).__name__}: {err}); it may be "
                           f"truncated or corrupt") from None
    finally:
        stream.seek(start)
    sizes = {}
    for info in infos:
        name = info.filename.split("/", 1)[-1]
        member = f"{what}: member {info.filename}"
        if name in sizes:
            raise ArchiveError(f"{member} is in the archive twice: the file was crafted or is corrupt")
        if info.header_offset + info.compress_size > end:
            raise ArchiveError(f"{member} lies at bytes {info.header_offset}..+{info.compress_size}, past the end of "
                               f"the file ({end} bytes): it is truncated or corrupt")
        if info.compress_type == zipfile.ZIP_STORED:
            bound = info.compress_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            bound = _DEFLATE_RATIO * info.compress_size + 1024
        else:
            raise ArchiveError(f"{member} is compressed with method {info.compress_type}; torch.save stores members "
                               f"uncompressed: the file was repacked or crafted")
        if info.file_size > bound:
            raise ArchiveError(f"{member} declares {info.file_size} bytes from {info.compress_size} stored: more than "
                               f"its compression can produce; the file was crafted or is corrupt")
        if name == "data.pkl" and info.file_size > PICKLE_LIMIT:
            raise ArchiveError(f"{member} declares {info.file_size} bytes of pickled structure, more than a "
                               f"checkpoint's holds (at most {PICKLE_LIMIT}; its tensors are stored apart): the file "
                               f"was crafted or is corrupt, and it is not inflated")
        sizes[name] = info.file_size
    return sizes


@dataclasses.dataclass(frozen=True)
class StorageRecord:
    """A tensor storage a torch.save pickle refers to (its persistent id), not read."""

    key: str
    dtype: torch.dtype
    numel: int


def storage_record(saved_id: Any, sizes: dict[str, int] | None, what: str) -> StorageRecord:
    """The storage that the persistent id `saved_id` (("storage", storage type, key, location,
    numel), as torch.save writes it; files of the format before zip archives add a view: None or
    (key, offset, size)) names; with the archive's member `sizes`, its record `data/<key>` must hold
    exactly those elements. ArchiveError otherwise."""
    if not (isinstance(saved_id, tuple) and len(saved_id) in (5, 6) and saved_id[0] == "storage"):
        raise pickle.UnpicklingError(f"unknown persistent id {str(saved_id)[:80]}")
    _, storage_type, key, _location, numel = saved_id[:5]
    view = saved_id[5] if len(saved_id) == 6 else None
    if storage_type is torch.UntypedStorage:
        dtype = torch.uint8
    else:
        with warnings.catch_warnings():  # the legacy storage classes warn on any use
            warnings.simplefilter("ignore")
            dtype = getattr(storage_type, "dtype", None)
    if not isinstance(dtype, torch.dtype) or type(numel) is not int or numel < 0:
        raise ArchiveError(f"{what}: storage {str(key)[:40]} is recorded as {numel!r} elements of {storage_type!r}: "
                           f"the file is corrupt")
    if sizes is not None:
        declared = sizes.get(f"data/{key}")
        if declared != numel * dtype.itemsize:
            held = "no such member" if declared is None else f"{declared} bytes"
            raise ArchiveError(f"{what}: storage data/{key} is recorded as {numel} {dtype} elements "
                               f"({numel * dtype.itemsize} bytes), the archive holds {held}: the file was edited or "
                               f"is corrupt")
    if view is not None:
        if not (isinstance(view, tuple) and len(view) == 3 and all(type(n) is int and n >= 0 for n in view[1:])
                and view[1] + view[2] <= numel):
            raise ArchiveError(f"{what}: storage {str(key)[:40]} of {numel} elements has the view {str(view)[:80]}, "
                               f"which it does not hold: the file is corrupt")
        return StorageRecord(str(key), dtype, view[2])
    return StorageRecord(str(key), dtype, numel)


def check_tensor_record(storage: Any, offset: Any, size: Any, stride: Any, what: str) -> None:
    """ArchiveError unless a tensor record (`storage`, a StorageRecord, viewed from `offset` with
    `size` and `stride`, as torch's _rebuild_tensor_v2 takes them) stays inside its storage: the one
    check of every tensor record read here (`load` for the trainer, `torchzip` for convert)."""
    record = f"{what}: a tensor record of shape {size!r}, stride {stride!r} at offset {offset!r}"
    if not isinstance(storage, StorageRecord):
        raise ArchiveError(f"{record} refers to {type(storage).__name__}, not a storage: the file is corrupt")
    if not (type(offset) is int and offset >= 0 and isinstance(size, (tuple, list, torch.Size))
            and isinstance(stride, (tuple, list)) and len(size) == len(stride)
            and all(type(n) is int and n >= 0 for n in (*size, *stride))):
        raise ArchiveError(f"{record} is malformed: the file is corrupt")
    end = offset if 0 in size else offset + 1 + sum((n - 1) * step for n, step in zip(size, stride))
    if end > storage.numel:
        raise ArchiveError(f"{record} reaches element {end} of storage data/{storage.key}, which holds "
                           f"{storage.numel}: the file was edited or is corrupt")


def tensor_builders(make, what: str) -> dict[Global, Any]:
    """What a pickle's tensor-building globals become when tensors are not built: each record checked
    (`check_tensor_record`), then `make(storage, offset, size, stride)` (a TensorRef, or nothing).
    A Parameter or a tensor with Python attributes gives its data."""
    def rebuild(storage, offset, size, stride, *unused):
        check_tensor_record(storage, offset, size, stride, what)
        return make(storage, offset, tuple(size), tuple(stride))

    def data_of(data, *unused):
        return data

    def from_type(func, new_type, args, state):
        return func(*args)

    return {("torch._utils", "_rebuild_tensor_v2"): rebuild, ("torch._utils", "_rebuild_parameter"): data_of,
            ("torch._utils", "_rebuild_parameter_with_state"): data_of,
            ("torch._tensor", "_rebuild_from_type_v2"): from_type}


class _Anything:
    """What a screen builds for an allowed class this environment does not define."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _Screen(Unpickler):
    """Reads a pickle through the allow-list without building tensors or reading storages (each
    tensor record checked against its storage, each storage against the archive's `sizes`);
    allowed globals this environment does not define (Transformer Engine's, without it) go to
    `missing`."""

    def __init__(self, file: BinaryIO, *, what: str, allowed: AllowList, sizes: dict[str, int] | None = None):
        super().__init__(file, trusted=False, what=what, allowed=allowed)
        self.missing: set[Global] = set()
        self.sizes = sizes
        self.storages: dict[str, int] = {}  # key: bytes, each storage once (tensors may share one)
        self.value: Any = None  # what the pickle gives (tensors as nothing, storages as StorageRecords)
        self.builders = tensor_builders(lambda *record: None, what)

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in self.allowed:
            raise _refusal(self.what, key, f"which is not among the globals {self.allowed.holders} hold")
        if key in _STORAGE_LOADERS:
            return self._nested
        if key in self.builders:
            return self.builders[key]
        found = _resolve(key)
        if found is None:
            self.missing.add(key)
            return _Anything
        self.found[key] = found
        return found

    def _nested(self, data: bytes) -> Any:
        """A storage pickled on its own (torch.save of it, inside a plain pickle): its record."""
        nested = _screen_archive(io.BytesIO(data), what=self.what, allowed=WEIGHTS)
        self.missing |= nested.missing
        return nested.value

    def persistent_load(self, saved_id: Any) -> StorageRecord:
        record = storage_record(saved_id, self.sizes, self.what)
        self.storages[record.key] = max(self.storages.get(record.key, 0), record.numel * record.dtype.itemsize)
        return record


def _screen_archive(stream: BinaryIO, *, what: str, allowed: AllowList) -> _Screen:
    """A screen of the torch.save file `stream` (its `found` and `missing` globals), every global
    checked against `allowed` and every tensor record against the file. Zip archives (torch >= 1.6)
    hold the pickle in data.pkl; older files are a run of pickles (magic number, protocol, system
    info, the object, its storage keys) followed by raw storages, which must fit in what follows."""
    start = stream.tell()
    is_zip = stream.read(4) == b"PK\x03\x04"
    stream.seek(start)
    if is_zip:
        sizes = archive_sizes(stream, what)
        screen = _Screen(io.BytesIO(torch._C.PyTorchFileReader(stream).get_record("data.pkl")), what=what,
                         allowed=allowed, sizes=sizes)
        screen.value = screen.load()
        return screen
    screens = [_Screen(stream, what=what, allowed=allowed) for _ in range(5)]
    for screen in screens:
        screen.value = screen.load()
    screens[0].value = screens[3].value  # the object (the others: magic number, protocol, system info, keys)
    position = stream.tell()
    left = stream.seek(0, os.SEEK_END) - position
    stream.seek(position)
    needed = sum(sum(screen.storages.values()) for screen in screens)
    if needed > left:
        raise ArchiveError(f"{what}: its records name storages of {needed} bytes, the file holds {left} after its "
                           f"pickles: it is truncated or was edited")
    for screen in screens[1:]:
        screens[0].found.update(screen.found)
        screens[0].missing |= screen.missing
    return screens[0]


def _stream(source: str | os.PathLike | bytes | BinaryIO) -> tuple[BinaryIO, bool]:
    """(a seekable binary stream, whether this function opened it)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source), False
    if isinstance(source, (str, os.PathLike)):
        return open(source, "rb"), True  # noqa: SIM115  (closed by the caller)
    return source, False


def load(source: str | os.PathLike | bytes | BinaryIO, *, trusted: bool, what: str | None = None,
         allowed: AllowList = CHECKPOINT, map_location: Any = "cpu") -> Any:
    """`torch.load` of a file, bytes or stream, allowed only the globals of `allowed` (any with
    `trusted=True`). Raises CheckpointCodeError for any other global (nothing of the file has run
    then), ConvertError for a file that is not a torch.save archive; FileNotFoundError passes."""
    what = what or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "a torch.save object")
    stream, opened = _stream(source)
    try:
        start = stream.tell()
        if trusted:  # run what it names, but inflate nothing beyond what the file can hold
            if stream.read(4) == b"PK\x03\x04":
                stream.seek(start)
                archive_sizes(stream, what)
            stream.seek(start)
            return torch.load(stream, map_location=map_location, weights_only=False)
        try:
            screen = _screen_archive(stream, what=what, allowed=allowed)
        except ConvertError:  # refused by the allow-list or by the archive's sizes, named there
            raise
        except Exception as err:  # noqa: BLE001  (miniz and pickle raise several types)
            raise ConvertError(f"{what} is not a complete torch.save file ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); it may be truncated or "
                               f"corrupt") from None
        if screen.missing:
            raise _refusal(what, min(screen.missing), "which this environment does not define")
        stream.seek(start)
        # torch's weights-only unpickler, allowed exactly what the screen found (under the names the
        # pickle uses): a second check, and the tensors built by torch itself.
        with torch.serialization.safe_globals([(obj, f"{m}.{n}") for (m, n), obj in screen.found.items()]):
            return torch.load(stream, map_location=map_location, weights_only=True)
    finally:
        if opened:
            stream.close()


def check_extra_state(value: Any, *, trusted: bool, what: str) -> None:
    """Raise CheckpointCodeError if a loaded `_extra_state` value would make Transformer Engine
    unpickle a global off TE_EXTRA_STATE: a non-empty byte tensor (TE 2.x: pickle.dumps of its FP8
    state, unpickled without restriction by TE before 2.18) or a BytesIO (TE 1.x: torch.save)."""
    if trusted:
        return
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.numel():
        screen = lambda: _Screen(io.BytesIO(value.detach().cpu().contiguous().numpy().tobytes()),  # noqa: E731
                                 what=what, allowed=TE_EXTRA_STATE).load()
    elif isinstance(value, io.BytesIO):
        screen = lambda: _screen_archive(io.BytesIO(value.getvalue()), what=what,  # noqa: E731
                                         allowed=TE_EXTRA_STATE)
    else:
        return
    try:
        screen()
    except ConvertError:
        raise
    except Exception as err:  # noqa: BLE001  (pickle and miniz raise several types)
        raise ConvertError(f"{what}: not a readable Transformer Engine state ({type(err).__name__}); the "
                           f"checkpoint may be corrupt") from None
