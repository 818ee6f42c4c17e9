"""What a checkpoint holds, independent of its file format, and the manifest that accounts for it.

Every format is read through a `CheckpointReader`: the logical (global, unsharded) tensors by
their torch_dist keys (`decoder.layers.3.mlp.experts.linear_fc1.weight`,
`optimizer.state.exp_avg.<key>`, `optimizer.main_param.<key>`), small replicated objects
(`..._extra_state`), and the `common` state (iteration, scheduler, optimizer hyper-parameters,
model config, layout). `read(name, index)` returns one tensor, or one block of it, so converting
never holds more than one tensor.

Manifest: name -> global shape, dtype and SHA-256 of the full logical tensor (C-contiguous bytes),
written beside every converted checkpoint and compared after writing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from megatron_switch.checkpoint.layout import CheckpointError, inside

Index = tuple[tuple[int, int], ...]  # [start, stop) per dimension
MANIFEST = "manifest.json"
OPTIMIZER_PREFIXES = ("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq.", "optimizer.main_param.")
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                    torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)}


class ConvertError(CheckpointError):
    """A checkpoint or a conversion request that cannot be honoured; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A logical tensor: its global shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def full_index(shape: Sequence[int]) -> Index:
    return tuple((0, n) for n in shape)


def block(tensor: torch.Tensor, index: Index, origin: Sequence[int] | None = None) -> torch.Tensor:
    """The view of `tensor` (whose element 0 sits at global `origin`) covering global `index`."""
    origin = origin or [0] * tensor.dim()
    for dim, ((start, stop), base) in enumerate(zip(index, origin)):
        tensor = tensor.narrow(dim, start - base, stop - start)
    return tensor


def param_key(name: str) -> str:
    """The model key an optimizer tensor belongs to (`name` itself for model tensors)."""
    for prefix in OPTIMIZER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def is_optimizer(name: str) -> bool:
    return name.startswith(OPTIMIZER_PREFIXES)


class CheckpointReader:
    """A checkpoint opened for conversion. Subclasses fill the attributes and `read`.

    tensors: name -> TensorSpec of every logical tensor.
    objects: name -> small Python object (Megatron's `_extra_state` entries), replicated.
    common: iteration, consumed_train_samples, scheduler, optimizer (param_groups),
        optimizer_step, model_config, layout ({"tp", "pp", "ep"}), as the trainer saves them.
    path: what to name in messages.
    trusted: the checkpoint's pickles are unpickled without `safe_pickle`'s allow-list
        (`--trust-checkpoint-code`).
    """

    format_name = ""

    def __init__(self, path: str, *, trusted: bool = False):
        self.path = path
        self.trusted = trusted
        self.tensors: dict[str, TensorSpec] = {}
        self.objects: dict[str, Any] = {}
        self.common: dict[str, Any] = {}

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        """The logical tensor `name`, or its block `index` (contiguous, CPU, a fresh tensor)."""
        raise NotImplementedError

    @property
    def has_optimizer(self) -> bool:
        return any(is_optimizer(n) for n in self.tensors)

    def close(self) -> None:
        pass


def checksum(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def tensor_entry(spec: TensorSpec, digest: str) -> dict[str, Any]:
    return {"shape": list(spec.shape), "dtype": str(spec.dtype).removeprefix("torch."), "sha256": digest}


BLOCK_BYTES = 64 * 2**20  # what one read of a manifest holds (a row at least)


def row_blocks(spec: TensorSpec, limit: int = BLOCK_BYTES) -> Iterable[Index]:
    """Consecutive blocks of whole rows (axis 0) of at most `limit` bytes (one row at least): in
    C order each block's bytes follow the previous block's."""
    if not spec.shape or spec.shape[0] == 0:
        yield full_index(spec.shape)
        return
    rows = max(1, limit // max(1, spec.nbytes // spec.shape[0]))
    for start in range(0, spec.shape[0], rows):
        yield ((start, min(start + rows, spec.shape[0])), *full_index(spec.shape[1:]))


def compute_manifest(reader: CheckpointReader, names: Iterable[str], progress,
                     check_finite: bool = True) -> dict[str, dict[str, Any]]:
    """Read each named tensor (in blocks of rows, one at a time: memory is BLOCK_BYTES, not the
    largest tensor) and describe it; `progress.update(bytes)`. The digest is that of the whole
    tensor's C-contiguous bytes. `check_finite`: refuse NaN and infinities (a source; a copy
    compared with its source's digests needs no second look)."""
    manifest = {}
    for name in names:
        spec = reader.tensors[name]
        digest = hashlib.sha256()
        for index in row_blocks(spec):
            tensor = reader.read(name, index) if spec.shape else reader.read(name)
            expected = tuple(b - a for a, b in index)
            if tuple(tensor.shape) != expected or tensor.dtype != spec.dtype:
                raise ConvertError(f"{reader.path}: {name} reads as {tuple(tensor.shape)} {tensor.dtype} at {index}, "
                                   f"its metadata says {expected} {spec.dtype}: the checkpoint is inconsistent")
            if check_finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ConvertError(f"{reader.path}: {name} holds NaN or infinite values: the checkpoint was saved "
                                   f"from a diverged run; convert an earlier iteration")
            digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            progress.update(tensor.numel() * tensor.element_size())
            del tensor
        manifest[name] = tensor_entry(spec, digest.hexdigest())
    return manifest


def compare_manifests(expected: dict[str, dict], found: dict[str, dict], where: str) -> None:
    """Raise ConvertError naming every tensor missing, extra or different in `found`."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    differ = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    if missing or extra or differ:
        parts = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} ({len(names)})"
                 for label, names in (("missing", missing), ("unexpected", extra), ("different", differ)) if names]
        raise ConvertError(f"{where} does not match the manifest: " + "; ".join(parts))


def write_manifest(path: str, manifest: dict[str, dict], extra: dict[str, Any]) -> None:
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump({**extra, "tensors": manifest}, f, indent=1, sort_keys=True)


def read_manifest(path: str) -> dict[str, Any] | None:
    """The manifest.json in `path` ({"tensors": ..., "iteration": ..., ...}), or None."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        return None
    try:
        with open(inside(path, MANIFEST, f"{path}: the manifest")) as f:
            manifest = json.load(f)
        manifest["tensors"]
        return manifest
    except (ValueError, KeyError, TypeError) as err:
        raise ConvertError(f"{file} is not a valid manifest ({err}); it may be truncated: remove it to "
                           f"convert without checking the source against it") from None
