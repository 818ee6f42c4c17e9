"""Writing a checkpoint out of any `CheckpointReader`, the way every `megatron-switch convert` does it.

Steps, each tensor read and held one block at a time (memory: a block, not the model):
  1. open the source, check the target layout (`sharding.check_layout`), refuse an existing target;
  2. manifest of the source (shape, dtype, SHA-256 of every full logical tensor), checked against
     the source's own manifest.json when it has one;
  3. write to a temporary sibling directory `<save>.tmp.<random>`;
  4. reopen what was written, recompute its manifest and compare: every tensor accounted for;
  5. write manifest.json and rename the directory to `<save>`.
A failure at any step removes the temporary directory: `<save>` either is complete or does not exist.
Every pickle of the source is read through `safe_pickle`'s allow-list unless the reader is trusted.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from tqdm import tqdm

from megatron_switch.checkpoint.contents import (
    CheckpointReader,
    ConvertError,
    compare_manifests,
    compute_manifest,
    is_optimizer,
    read_manifest,
    write_manifest,
)
from megatron_switch.checkpoint.integrity import record_integrity, verify_checkpoint
from megatron_switch.checkpoint.layout import (
    TRACKER,
    CheckpointError,
    checkpoint_dir,
    checkpoint_format,
    latest_checkpoint,
    write_tracker,
)
from megatron_switch.checkpoint.sharding import EXPERTS, check_layout, count_layers
from megatron_switch.parallel import Layout

FORMATS = ("torch", "torch_dist", "safetensors")


def open_checkpoint(path: str, *, trusted: bool = False) -> CheckpointReader:
    """A checkpoint root (with latest_checkpointed_iteration.txt), an iter_XXXXXXX directory of
    either per-rank format, or a consolidated safetensors directory; `trusted`: its pickles are read
    without the allow-list."""
    from megatron_switch.checkpoint.consolidated import (
        ConsolidatedReader,
        is_consolidated_dir,
    )
    from megatron_switch.checkpoint.distcp import DistCheckpointReader
    from megatron_switch.checkpoint.legacy import LegacyReader

    if not os.path.isdir(path):
        raise ConvertError(f"--load {path}: no such directory")
    if is_consolidated_dir(path):
        return ConsolidatedReader(path, trusted=trusted)
    iter_dir = path
    if os.path.isfile(os.path.join(path, TRACKER)):
        iter_dir = latest_checkpoint(path)[1]
    kind = checkpoint_format(iter_dir)
    if kind is not None:
        try:  # recorded checksums first: nothing damaged is read, let alone copied
            verify_checkpoint(iter_dir)
        except CheckpointError as error:
            raise ConvertError(str(error)) from None
    if kind == "torch_dist":
        return DistCheckpointReader(iter_dir, trusted=trusted)
    if kind == "torch":
        return LegacyReader(iter_dir, trusted=trusted)
    raise ConvertError(f"--load {path}: neither a checkpoint root (with {TRACKER}), an iter_XXXXXXX "
                       f"directory (torch_dist or mp_rank_* files) nor a safetensors directory")


def _model_config(reader: CheckpointReader) -> dict:
    """The source's model_config, its layer count checked against its tensors (a layout's stages
    and the lists of layers are built from it)."""
    config = dict(reader.common.get("model_config") or {})
    layers = count_layers(reader.tensors)
    config.setdefault("num_layers", layers)
    if layers and config["num_layers"] != layers:
        raise ConvertError(f"{reader.path}: its model_config gives num_layers {config['num_layers']!r}, its tensors "
                           f"hold {layers} layers (decoder.layers.0 ... {layers - 1}): the record was edited or "
                           f"belongs to another model")
    experts = [s.shape[0] for n, s in reader.tensors.items() if EXPERTS in n]
    if experts:
        config.setdefault("num_experts", experts[0])
    return config


def target_layout(reader: CheckpointReader, tp, pp, ep) -> Layout:
    source = Layout.from_dict(reader.common["layout"]) if reader.common.get("layout") else Layout()
    return Layout(tp or source.tp, pp or source.pp, ep or source.ep)


def _check_recorded_manifest(reader: CheckpointReader, manifest: dict, load: str) -> None:
    """Compare the source with the manifest.json a conversion left beside it (same iteration)."""
    places = [reader.path] + ([] if reader.format_name == "safetensors" else [os.path.dirname(reader.path)])
    for place in places:
        recorded = read_manifest(place)
        if recorded is not None and recorded.get("iteration") == reader.common.get("iteration"):
            tensors = recorded["tensors"]
            compare_manifests({n: tensors[n] for n in manifest if n in tensors},
                              {n: manifest[n] for n in manifest if n in tensors}, f"source {load}")
            return


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


def check_new_directory(path: str, flag: str) -> str:
    """`path` made absolute; ConvertError if it exists or its parent does not."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        raise ConvertError(f"{flag} {path} already exists: convert never overwrites a checkpoint; choose "
                           f"a new directory, or remove that one first to replace it")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ConvertError(f"{flag} {path}: the parent directory {parent} does not exist")
    return path


def check_target_flags(target_tp: int | None, target_pp: int | None, target_ep: int | None,
                       fmt: str | None) -> None:
    for flag, value in (("--target-tp", target_tp), ("--target-pp", target_pp), ("--target-ep", target_ep)):
        if value is not None and value < 1:
            raise ConvertError(f"{flag} must be >= 1, got {value} (leave it out to keep the source's)")
    if fmt is not None and fmt not in FORMATS:
        raise ConvertError(f"--format {fmt}: use one of {', '.join(FORMATS)}")


def write_converted(reader: CheckpointReader, save: str, target_tp: int | None = None,
                    target_pp: int | None = None, target_ep: int | None = None, fmt: str | None = None,
                    no_optim: bool = False, progress: bool = True, log=print,
                    extra_files: dict[str, str] | None = None) -> dict:
    """Write what `reader` holds as the new checkpoint `save` (absolute, checked by the caller):
    manifest, temporary directory, verification, atomic rename (see the module docstring).
    `extra_files`: {name: text} written into the checkpoint root beside it. Returns the manifest."""
    from megatron_switch.checkpoint.consolidated import write_consolidated
    from megatron_switch.checkpoint.distcp import write_dist_checkpoint
    from megatron_switch.checkpoint.legacy import write_legacy

    load = reader.path
    parent = os.path.dirname(save)
    fmt = fmt or reader.format_name
    config = _model_config(reader)
    layout = target_layout(reader, target_tp, target_pp, target_ep)
    source_tp = Layout.from_dict(reader.common["layout"]).tp if reader.common.get("layout") else 1
    if (config.get("swiglu") or config.get("gated_linear_unit")) and layout.tp != source_tp:
        raise ConvertError(f"{load} has gated dense MLPs (--swiglu): Megatron shards their [gate; up] "
                           f"linear_fc1 per tensor-parallel rank, which this converter does not re-split; "
                           f"keep --target-tp {source_tp}")
    model_names = sorted(n for n in reader.tensors if not is_optimizer(n))
    check_layout(layout, {n: reader.tensors[n].shape for n in model_names}, config)
    names = sorted(reader.tensors) if not no_optim else model_names
    dropped = len(reader.tensors) - len(names)
    if dropped:
        log(f" --no-optim: dropping {dropped} optimizer tensors (Adam moments, float32 master weights); "
            f"a run that loads the result starts Adam from zero")
    elif no_optim:
        log(" --no-optim: the source has no optimizer state")
    log(f" converting {reader.format_name} {load} -> {fmt} {save} at {layout} "
        f"({len(names)} tensors, {sum(reader.tensors[n].nbytes for n in names) / 2**20:.1f} MiB); "
        f"per-rank RNG states are not carried over")
    common = {k: v for k, v in reader.common.items() if k != "world_size"}
    common.update(layout=layout.as_dict(), model_config=config)
    if no_optim:
        common = {k: v for k, v in common.items() if k not in ("optimizer", "optimizer_step")}
    total = sum(reader.tensors[n].nbytes for n in names)
    with _bar(total, "checking source", progress) as bar:
        manifest = compute_manifest(reader, names, bar)
    if reader.format_name in FORMATS:
        _check_recorded_manifest(reader, manifest, load)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(save) + ".tmp.", dir=parent)
    try:
        iteration = int(common.get("iteration") or 0)
        with _bar(total, f"writing {fmt}", progress) as bar:
            if fmt == "safetensors":
                write_consolidated(os.path.join(tmp, "data"), reader, names, common, bar)
                written = os.path.join(tmp, "data")
            else:
                root = os.path.join(tmp, "data")
                os.makedirs(root)
                target = checkpoint_dir(root, iteration)
                num_layers = int(config["num_layers"])
                if fmt == "torch":
                    write_legacy(target, reader, names, common, layout, num_layers, bar)
                else:
                    write_dist_checkpoint(target, reader, names, common, layout, num_layers, bar)
                record_integrity(target, {"iteration": iteration, "format": fmt, "model_config": config,
                                          "layout": layout.as_dict(), "written_by": "megatron-switch convert",
                                          "converted_from": os.path.abspath(load)})
                write_tracker(root, iteration)
                written = root
        result = open_checkpoint(written, trusted=reader.trusted)
        try:
            with _bar(total, "verifying", progress) as bar:
                found = compute_manifest(result, sorted(result.tensors), bar, check_finite=False)
        finally:
            result.close()
        compare_manifests(manifest, found, f"the converted checkpoint {save}")
        write_manifest(written, manifest, {"format": fmt, "layout": layout.as_dict(), "iteration": iteration})
        for name, text in (extra_files or {}).items():
            with open(os.path.join(written, name), "w") as f:
                f.write(text)
        sync_tree(written)  # on disk before the name says "complete": a power loss cannot half-write it
        os.rename(written, save)
        sync_tree(os.path.dirname(os.path.abspath(save)), recursive=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f" wrote {save}: {len(manifest)} tensors, each checked against the source")
    return manifest


def sync_tree(path: str, recursive: bool = True) -> None:
    """fsync every file below `path` and the directories themselves."""
    def sync(name: str, flags: int) -> None:
        fd = os.open(name, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    if recursive:
        for folder, _, files in os.walk(path):
            for file in files:
                sync(os.path.join(folder, file), os.O_RDONLY)
            sync(folder, os.O_RDONLY)
    else:
        sync(path, os.O_RDONLY)
