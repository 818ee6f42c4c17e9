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


def _placeholder(*args: Any) -> None:
    return None


class _Anything:
    """What a screen builds for an allowed class this environment does not define."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# What a screen builds instead of tensors: nothing (no storage is read).
_TENSOR_BUILDERS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._tensor", "_rebuild_from_type_v2")}


class _Screen(Unpickler):
    """Reads a pickle through the allow-list without building tensors or reading storages; allowed
    globals this environment does not define (Transformer Engine's, without it) go to `missing`."""

    def __init__(self, file: BinaryIO, *, what: str, allowed: AllowList):
        super().__init__(file, trusted=False, what=what, allowed=allowed)
        self.missing: set[Global] = set()

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in self.allowed:
            raise _refusal(self.what, key, f"which is not among the globals {self.allowed.holders} hold")
        if key in _STORAGE_LOADERS:
            return self._nested
        if key in _TENSOR_BUILDERS:
            return _placeholder
        found = _resolve(key)
        if found is None:
            self.missing.add(key)
            return _Anything
        self.found[key] = found
        return found

    def _nested(self, data: bytes) -> None:
        self.missing |= _screen_archive(io.BytesIO(data), what=self.what, allowed=WEIGHTS).missing

    def persistent_load(self, saved_id: Any) -> None:
        if not (isinstance(saved_id, tuple) and saved_id and saved_id[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {saved_id!r}")
        return None


def _screen_archive(stream: BinaryIO, *, what: str, allowed: AllowList) -> _Screen:
    """A screen of the torch.save file `stream` (its `found` and `missing` globals), every global
    checked against `allowed`. Zip archives (torch >= 1.6) hold the pickle in data.pkl; older files
    are a run of pickles (magic number, protocol, system info, the object, its storage keys) followed
    by raw storages."""
    start = stream.tell()
    is_zip = stream.read(4) == b"PK\x03\x04"
    stream.seek(start)
    if is_zip:
        screen = _Screen(io.BytesIO(torch._C.PyTorchFileReader(stream).get_record("data.pkl")), what=what,
                         allowed=allowed)
        screen.load()
        return screen
    screens = [_Screen(stream, what=what, allowed=allowed) for _ in range(5)]
    for screen in screens:
        screen.load()
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
        if trusted:
            return torch.load(stream, map_location=map_location, weights_only=False)
        start = stream.tell()
        try:
            screen = _screen_archive(stream, what=what, allowed=allowed)
        except CheckpointCodeError:
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
    except CheckpointCodeError:
        raise
    except Exception as err:  # noqa: BLE001  (pickle and miniz raise several types)
        raise ConvertError(f"{what}: not a readable Transformer Engine state ({type(err).__name__}); the "
                           f"checkpoint may be corrupt") from None
