"""torch_dist checkpoints (megatron `dist_checkpointing` over PyTorch Distributed Checkpoint), offline,
and the trainer's torch_dist load, with every pickle read through `safe_pickle`'s allow-list.

Reading: one block of one tensor at a time through `torch.distributed.checkpoint`'s
`FileSystemReader` (the metadata is read once; only the stored chunks that overlap the block are read).
Writing: one process writes what a save at the target layout would: every tensor split into the
target layout's chunks, one `__<i>_0.distcp` file per (TP, PP, EP) rank coordinate, a chunk
produced only when the writer reaches it; plus megatron's `metadata.json` and `common.pt`.
The result loads with `dist_checkpointing.load` at any layout (the trainer's `--load`).

The pickles of a torch_dist checkpoint: `.metadata` (torch's `FileSystemReader.read_metadata` is a
plain `pickle.load`), the common state (`common.pt`; megatron-core >= 0.19 keeps it as an object
inside the checkpoint), and each megatron ShardedObject (`rng_state`, `_extra_state`: a torch.save
archive in the .distcp files, which torch's default load planner reads with
`torch.load(weights_only=False)`). Here all of them are read through the allow-list
(`read_metadata`, `read_common_state`, `read_objects`). For the trainer, `load_dist_checkpoint`
wraps megatron's `dist_checkpointing.load`: the objects are taken out of the template and read
here; megatron then reads only tensors, and reads `.metadata` and the common state again itself,
after they were read here through the allow-list (the same bytes: what it unpickles was accepted;
a file swapped between the two reads needs write access to the checkpoint during the load). This
works alike with megatron-core 0.16 and 0.19, whose `load` signatures differ.
"""

from __future__ import annotations

import collections
import ctypes
import io
import math
import os
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    create_default_global_save_plan,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import (
    create_read_items_for_chunk_list,
)

from megatron_switch.checkpoint.contents import (
    BLOCK_BYTES,
    CheckpointReader,
    ConvertError,
    Index,
    TensorSpec,
    full_index,
)
from megatron_switch.checkpoint.layout import CheckpointError, inside
from megatron_switch.checkpoint.safe_pickle import (
    DCP_METADATA,
    Unpickler,
    check_extra_state,
    load,
)
from megatron_switch.checkpoint.sharding import distinct_parts, placement
from megatron_switch.compat.megatron_core import COMMON_STATE_FILE, COMMON_STATE_KEY, common_state_file
from megatron_switch.parallel import Layout

METADATA = ".metadata"
CONFIG = "metadata.json"
RNG_KEY = "rng_state"


def _object_key(key: str) -> str:
    """DCP key of a replicated megatron ShardedObject (global shape (1,), offset (0,))."""
    return f"{key}/shard_0_1"


class _BlockLoadPlanner(LoadPlanner):
    """Copies the requested block of one tensor into `out`."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def set_up_planner(self, *args, **kwargs):
        pass

    def create_local_plan(self):
        raise NotImplementedError

    def create_global_plan(self, plans):
        return plans

    def finish_plan(self, plan):
        return plan

    def load_bytes(self, read_item, value):
        raise AssertionError("tensor reads only")

    def resolve_tensor(self, read_item):
        view = self.out
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item, tensor):
        pass


def read_metadata(path: str, *, trusted: bool) -> Metadata:
    """The `.metadata` of the torch_dist directory `path`, unpickled through the allow-list, and its
    storage index checked (`check_metadata`) before any file it names is opened."""
    file = os.path.join(path, METADATA)
    with open(inside(path, METADATA, f"{path}: the storage index"), "rb") as f:
        metadata = Unpickler(f, trusted=trusted, what=file, allowed=DCP_METADATA).load()
    check_metadata(path, metadata)
    return metadata


def check_metadata(path: str, metadata: Any) -> None:
    """ConvertError unless the storage index `metadata` of torch_dist directory `path` stays inside
    what the directory holds: every file it names is inside `path` (`layout.inside`), every stored
    item is a byte range inside its file, every tensor chunk lies within its tensor's shape and fits
    in the bytes stored for it, and a tensor's chunks hold at least its elements. So no size read
    from the index allocates more than the files hold, and no file outside is read."""
    file = os.path.join(path, METADATA)
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict) \
            or not isinstance(metadata.state_dict_metadata, dict):
        raise ConvertError(f"{file} is not a torch_dist storage index: the checkpoint is damaged")
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        where = f"{file}: the storage entry of {getattr(index, 'fqn', index)}"
        name = getattr(info, "relative_path", None)
        if not (isinstance(name, str) and name in sizes):
            stored = inside(path, name, where)
            if not os.path.isfile(stored):
                raise ConvertError(f"{where} names {name}, which is not in {path}: the checkpoint is incomplete; "
                                      f"copy the missing file from where it was saved")
            sizes[name] = os.path.getsize(stored)
        start, length = getattr(info, "offset", None), getattr(info, "length", None)
        if type(start) is not int or type(length) is not int or start < 0 or length < 0 \
                or start + length > sizes[name]:
            raise ConvertError(f"{where}: bytes {start!r}..+{length!r} of {name}, which holds {sizes[name]} bytes: "
                                  f"the file is truncated or corrupt")
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            _check_chunks(file, fqn, meta, metadata.storage_data)


def _check_chunks(file: str, fqn: str, meta: TensorStorageMetadata, storage: dict) -> None:
    """`meta`'s chunks inside its shape and inside their stored bytes; together at least its elements."""
    where = f"{file}: tensor {fqn}"
    shape = tuple(meta.size)
    element = meta.properties.dtype.itemsize
    if any(type(n) is not int or n < 0 for n in shape):
        raise ConvertError(f"{where} has shape {shape}: the index is damaged")
    held = 0
    for chunk in meta.chunks:
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                type(a) is not int or type(n) is not int or a < 0 or n < 0 or a + n > dim
                for a, n, dim in zip(offsets, sizes, shape)):
            raise ConvertError(f"{where}: a chunk at {offsets} of {sizes} lies outside its shape {shape}: the "
                                  f"index is damaged")
        info = storage.get(MetadataIndex(fqn, offsets))
        if info is None:
            raise ConvertError(f"{where}: the chunk at {offsets} has no storage entry: the index is damaged")
        numel = math.prod(sizes)
        if not getattr(info, "transform_descriptors", None) and numel * element > info.length:
            raise ConvertError(f"{where}: the chunk at {offsets} has {numel} elements ({numel * element} bytes), "
                                  f"stored in {info.length} bytes: the index is damaged")
        held += numel
    if held < math.prod(shape):
        raise ConvertError(f"{where} has shape {shape} ({math.prod(shape)} elements), its chunks hold {held}: "
                              f"the index is damaged")


class _KnownMetadataReader(FileSystemReader):
    """torch's reader, given the metadata read through the allow-list (its own read is pickle.load)."""

    def __init__(self, path: str, metadata: Metadata):
        super().__init__(path)
        self._known = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if getattr(self._known, "storage_meta", None) is not None:
            self._known.storage_meta.load_id = self.load_id
        return self._known


class _BytesPlanner(DefaultLoadPlanner):
    """Keeps each object's bytes (torch's own planner unpickles them with weights_only=False)."""

    def __init__(self):
        super().__init__()
        self.raw: dict[str, bytes] = {}

    def load_bytes(self, read_item, value):
        self.raw[read_item.dest_index.fqn] = value.getvalue()


def read_objects(path: str, keys, *, trusted: bool, metadata: Metadata | None = None) -> dict[str, Any]:
    """{key: value} for the DCP byte items `keys` (megatron ShardedObjects by unique key, each value
    the list megatron saved: torch.save([object, ...])), unpickled through the allow-list."""
    import torch.distributed.checkpoint as dcp

    keys = list(keys)
    if not keys:
        return {}
    metadata = metadata if metadata is not None else read_metadata(path, trusted=trusted)
    planner = _BytesPlanner()
    dcp.load(dict.fromkeys(keys), storage_reader=_KnownMetadataReader(path, metadata), planner=planner,
             no_dist=True)
    return {key: load(planner.raw[key], trusted=trusted, what=f"{path}: object {key}") for key in keys}


def read_common_state(path: str, *, trusted: bool) -> dict:
    """The common state (iteration, scheduler, model config, ...; Megatron-LM's `args`): common.pt, or
    where megatron-core >= 0.19 keeps it, inside the checkpoint; through the allow-list."""
    file = common_state_file(path)
    if file is not None:
        return load(inside(path, COMMON_STATE_FILE, f"{path}: the common state"), trusted=trusted)
    key = _object_key(COMMON_STATE_KEY)
    return read_objects(path, [key], trusted=trusted)[key][0]


def load_dist_checkpoint(template: dict, path: str, *, trusted: bool) -> dict:
    """`dist_checkpointing.load(template, path)` with every pickle read through the allow-list (see the
    module docstring): the ShardedObjects of `template` are read here (a Transformer Engine
    `_extra_state` checked before a model hands it to TE's pickle.loads), the rest by megatron."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import (
        dict_list_map_inplace,
        extract_matching_values,
        merge,
        nested_values,
    )
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    metadata = read_metadata(path, trusted=trusted)
    read_common_state(path, trusted=trusted)
    objects, rest = extract_matching_values(template, lambda v: isinstance(v, ShardedObject))
    loaded = dist_checkpointing.load(rest, path)
    values = read_objects(path, sorted({o.unique_key for o in nested_values(objects)}), trusted=trusted,
                          metadata=metadata)
    taken: collections.Counter = collections.Counter()

    def fill(sharded: ShardedObject) -> Any:  # megatron's order: the n-th object of a key gets item n
        value = values[sharded.unique_key][taken[sharded.unique_key]]
        taken[sharded.unique_key] += 1
        if sharded.key.endswith("_extra_state"):
            check_extra_state(value, trusted=trusted, what=f"{path}: object {sharded.unique_key}")
        return value

    return merge(loaded, dict_list_map_inplace(fill, objects))


class DistCheckpointReader(CheckpointReader):
    """An `iter_XXXXXXX` directory written by `dist_checkpointing.save` (torch_dist)."""

    format_name = "torch_dist"

    def __init__(self, path: str, *, trusted: bool = False):
        super().__init__(path, trusted=trusted)
        self._reader = FileSystemReader(path)
        try:
            self._metadata = read_metadata(path, trusted=trusted)
            self.common = read_common_state(path, trusted=trusted)
        except CheckpointError:  # named by the checks (and the allow-list) already
            raise
        except Exception as err:  # noqa: BLE001  (pickle, zip and I/O raise several types)
            raise ConvertError(f"{path}: torch_dist metadata cannot be read ({type(err).__name__}: {err}); "
                               f"the checkpoint is truncated or corrupt") from None
        self._reader.set_up_storage_reader(self._metadata, True)
        object_keys = []
        for key, meta in self._metadata.state_dict_metadata.items():
            if isinstance(meta, TensorStorageMetadata):
                self.tensors[key] = TensorSpec(tuple(meta.size), meta.properties.dtype)
            elif isinstance(meta, BytesStorageMetadata) and not key.startswith((RNG_KEY + "/", COMMON_STATE_KEY + "/")):
                object_keys.append(key)
        self.objects = self._read_objects(object_keys)

    def _read_objects(self, keys) -> dict[str, Any]:
        try:
            values = read_objects(self.path, keys, trusted=self.trusted, metadata=self._metadata)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ConvertError(f"{self.path}: objects cannot be read ({type(err).__name__}); the checkpoint "
                               f"is truncated or corrupt") from None
        # megatron stores a ShardedObject as torch.save([value]) under "<key>/shard_<offset>_<shape>"
        return {key.rsplit("/shard_", 1)[0]: value[0] for key, value in values.items()}

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        spec = self.tensors[name]
        index = index or full_index(spec.shape)
        out = torch.empty([b - a for a, b in index], dtype=spec.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size([a for a, _ in index]), sizes=torch.Size(out.shape))
        items = create_read_items_for_chunk_list(name, self._metadata.state_dict_metadata[name], [chunk])
        plan = self._reader.prepare_global_plan([self._reader.prepare_local_plan(LoadPlan(items))])[0]
        try:
            self._reader.read_data(plan, _BlockLoadPlanner(out)).wait()
        except Exception as err:  # noqa: BLE001
            raise ConvertError(f"{self.path}: {name} cannot be read ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); a .distcp file is truncated "
                               f"or corrupt") from None
        return out


class _StreamingSavePlanner(SavePlanner):
    """Produces each chunk from the source only when the storage writer asks for it."""

    def __init__(self, produce):
        self.produce = produce

    def set_up_planner(self, *args, **kwargs):
        pass

    def create_local_plan(self):
        raise NotImplementedError

    def create_global_plan(self, plans):
        raise NotImplementedError

    def finish_plan(self, plan):
        return plan

    def resolve_data(self, write_item):
        return self.produce(write_item)


def _load_libc():
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _release_freed_heap() -> None:
    """Return the C heap's free pages to the system (glibc's `malloc_trim`; elsewhere nothing)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _pieces(part: Index, spec: TensorSpec) -> list[Index]:
    """`part` of a tensor cut along its first axis into pieces of at most BLOCK_BYTES (a row at least)."""
    if not part:
        return [part]
    (start, stop), rest = part[0], part[1:]
    row = math.prod(b - a for a, b in rest) * spec.nbytes // max(1, math.prod(spec.shape))
    rows = max(1, BLOCK_BYTES // max(1, row))
    return [((a, min(a + rows, stop)), *rest) for a in range(start, stop, rows)] or [part]


def write_dist_checkpoint(path: str, source: CheckpointReader, names, common: dict, layout: Layout,
                          num_layers: int, progress) -> None:
    """Write `names` of `source` (and its objects) to the new directory `path` as torch_dist,
    chunked as a save at `layout` would chunk them; a part over BLOCK_BYTES (a whole expert bank at
    EP=1, say) is stored as several chunks of whole rows, so that no read or write holds more
    (dist_checkpointing reads any chunking back at any layout)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    os.makedirs(path)
    coords = layout.coords()
    plans: list[list[WriteItem]] = [[] for _ in coords]
    blocks: dict[tuple[str, tuple[int, ...]], Index] = {}
    for name in names:
        spec = source.tensors[name]
        for coord, part in distinct_parts(name, spec.shape, layout, num_layers):
            for index in _pieces(part, spec):
                offsets = torch.Size([a for a, _ in index])
                chunk = ChunkStorageMetadata(offsets=offsets, sizes=torch.Size([b - a for a, b in index]))
                plans[coords.index(coord)].append(WriteItem(
                    index=MetadataIndex(name, offsets), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=spec.dtype),
                                                size=torch.Size(spec.shape))))
                blocks[(name, tuple(offsets))] = index
    for key in source.objects:
        stage = placement(key, layout, num_layers).stage
        plans[coords.index((0, stage, 0))].append(
            WriteItem(index=MetadataIndex(_object_key(key)), type=WriteItemType.BYTE_IO))

    written: list[torch.Tensor] = []

    def produce(item: WriteItem):
        if item.type == WriteItemType.BYTE_IO:
            data = io.BytesIO()
            torch.save([source.objects[item.index.fqn.rsplit("/shard_", 1)[0]]], data)
            data.seek(0)
            return data
        # torch's storage writer keeps every chunk of a file it has written until the file is closed (in
        # a dict it only writes out for safetensors output): the chunk it wrote before asking for this
        # one is freed here (a reader returns fresh tensors only), else a rank file's writer would hold
        # that rank's whole share of the checkpoint. It also `torch.save`s each chunk into a stream it
        # cannot seek, so torch builds the record in a growing heap buffer first, whose freed pieces
        # glibc keeps: they are handed back too (measured on a 2.4 GB rank file: the writer's peak
        # beyond the imports went from +830 MiB to +430 MiB with the first, to +130 MiB with both).
        for done in written:
            done.untyped_storage().resize_(0)
        written.clear()
        _release_freed_heap()
        index = blocks[(item.index.fqn, tuple(item.index.offset))]
        tensor = source.read(item.index.fqn, index)
        if not tensor.untyped_storage().resizable():  # (memory a file or buffer lends)
            tensor = tensor.clone()
        progress.update(tensor.numel() * tensor.element_size())
        written.append(tensor)
        return tensor

    writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1)
    writer.set_up_storage_writer(True)
    local = [writer.prepare_local_plan(SavePlan(items)) for items in plans if items]
    global_plans, metadata = create_default_global_save_plan(local)
    global_plans = writer.prepare_global_plan(global_plans)
    planner = _StreamingSavePlanner(produce)
    results = [writer.write_data(plan, planner).wait() for plan in global_plans]
    writer.finish(metadata, results)
    torch.save(common, os.path.join(path, COMMON_STATE_FILE))
    save_config(CheckpointingConfig("torch_dist", 1), path)

