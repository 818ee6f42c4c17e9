"""Megatron-LM's legacy per-rank checkpoint format (`--ckpt-format torch`).

`iter_XXXXXXX/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`, named as Megatron-LM's
`get_checkpoint_name` names it (`_PPP` when PP > 1, `_EEE` when EP > 1), one file for every
(TP, PP, EP) rank coordinate, each a `torch.save` dict with Megatron's keys:
  args                   argparse.Namespace: the layout (tensor/pipeline/expert_model_parallel_size),
                         the model shape, iteration and consumed_train_samples
  checkpoint_version     3.0
  iteration              int
  model                  {local key: tensor}: torch_dist keys with layers numbered from 0 on the
                         stage (as Megatron-LM writes a Transformer Engine GPT), this rank's part
  optimizer              torch's Adam state dict {"state": {i: {step, exp_avg, exp_avg_sq}},
                         "param_groups": [{..., "params": [i], "param_names": [local key]}]};
                         with float32 master weights (--bf16) Megatron's mixed-precision layout
                         {"optimizer": <that>, "fp32_from_fp16_params": [[master or None per param]]}
  opt_param_scheduler    the LR scheduler's state dict
  num_floating_point_operations_so_far
RNG states are per-rank streams and are not written (Megatron-LM: load with --no-load-rng).
Files are read and written one tensor at a time (`torchzip`), read through `safe_pickle`'s allow-list
unless the reader is told to trust them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
from typing import Any

import torch

from megatron_switch.checkpoint.contents import (
    CheckpointReader,
    ConvertError,
    Index,
    TensorSpec,
    block,
    full_index,
    is_optimizer,
)
from megatron_switch.checkpoint.layout import inside
from megatron_switch.checkpoint.sharding import (
    Coord,
    Layout,
    count_layers,
    distinct_parts,
    global_name,
    holders,
    local_name,
    placement,
)
from megatron_switch.checkpoint.torchzip import (
    PendingTensor,
    TensorRef,
    TorchFileError,
    TorchFileReader,
    write_torch_file,
)

FILENAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_STATE_PREFIX = {"exp_avg": "optimizer.state.exp_avg.", "exp_avg_sq": "optimizer.state.exp_avg_sq."}
MASTER_PREFIX = "optimizer.main_param."


def rank_dir_name(layout: Layout, coord: Coord) -> str:
    """As Megatron-LM's get_checkpoint_name: mp_rank_TT[_PPP][_EEE]."""
    t, p, e = coord
    name = f"mp_rank_{t:02d}" if layout.pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
    return name + (f"_{e:03d}" if layout.ep > 1 else "")


def rank_file(iter_dir: str, layout: Layout, coord: Coord) -> str:
    return os.path.join(iter_dir, rank_dir_name(layout, coord), FILENAME)


def optimizer_parts(optimizer: dict) -> tuple[dict, list | None]:
    """(Adam state dict, fp32 master groups or None) of a legacy file's `optimizer` entry."""
    if "fp32_from_fp16_params" in optimizer:
        return optimizer["optimizer"], optimizer["fp32_from_fp16_params"]
    return optimizer, None


def layout_of_args(args) -> Layout:
    return Layout(getattr(args, "tensor_model_parallel_size", 1) or 1,
                  getattr(args, "pipeline_model_parallel_size", 1) or 1,
                  getattr(args, "expert_model_parallel_size", 1) or 1)


def _bounded_layout(args, path: str, rank_dirs: list[str], file: str) -> Layout:
    """The layout rank file `file`'s `args` record, refused unless its sizes are positive integers
    and its TP x PP x EP rank files could all be among the `rank_dirs` (mp_rank_* directories) of
    `path`: the sizes are read from a file, and the list of rank files is built from them."""
    sizes = {name: getattr(args, f"{name}_model_parallel_size", 1) or 1 for name in ("tensor", "pipeline", "expert")}
    for name, size in sizes.items():
        if type(size) is not int or not 1 <= size <= len(rank_dirs):
            raise ConvertError(f"{file}: args.{name}_model_parallel_size is {size!r}, but the checkpoint has "
                               f"{len(rank_dirs)} mp_rank_* directories (one per TP x PP x EP rank): the file was "
                               f"edited or is corrupt")
    layout = Layout(sizes["tensor"], sizes["pipeline"], sizes["expert"])
    files = layout.tp * layout.pp * layout.ep
    if files > len(rank_dirs):  # one is missing among the first len(rank_dirs) + 1
        held = set(rank_dirs)
        first = next(c for c in itertools.product(range(layout.pp), range(layout.tp), range(layout.ep))
                     if rank_dir_name(layout, (c[1], c[0], c[2])) not in held)
        raise ConvertError(f"missing rank file {rank_file(path, layout, (first[1], first[0], first[2]))}: a legacy "
                           f"checkpoint saved at {layout} has {files} files (mp_rank_TT[_PPP][_EEE]), {path} holds "
                           f"{len(rank_dirs)}; copy the missing ones from the training run")
    return layout


MODEL_CONFIG_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_experts",
                     "padded_vocab_size", "max_position_embeddings", "untie_embeddings_and_output_weights",
                     "swiglu")


class LegacyReader(CheckpointReader):
    """An `iter_XXXXXXX` directory of per-rank `model_optim_rng.pt` files (`trusted`: unpickled
    without the allow-list)."""

    format_name = "torch"

    def __init__(self, path: str, *, trusted: bool = False):
        super().__init__(path, trusted=trusted)
        names = sorted(n for n in os.listdir(path) if _RANK_DIR.match(n))
        if not names:
            raise ConvertError(f"{path}: no mp_rank_* directories: not a legacy (--ckpt-format torch) checkpoint")
        with self._open_file(os.path.join(path, names[0], FILENAME)) as first:
            head = {k: v for k, v in first.structure.items() if k not in ("model", "optimizer")}
            first_layers = count_layers(first.structure.get("model") or {})
        self.layout = _bounded_layout(head["args"], path, names, os.path.join(path, names[0], FILENAME))
        self.refs: dict[Coord, dict[str, Any]] = {}
        self.files = {c: rank_file(path, self.layout, c) for c in self.layout.coords()}
        missing = [f for f in self.files.values() if not os.path.isfile(f)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConvertError(f"missing rank file {missing[0]}{more}: "
                               f"a legacy checkpoint saved at {self.layout} has {len(self.files)} files "
                               f"(mp_rank_TT[_PPP][_EEE]); copy the missing ones from the training run")
        args = head["args"]
        self.num_layers = getattr(args, "num_layers", None) or first_layers * self.layout.pp
        if self.num_layers != first_layers * self.layout.pp:  # (names[0] is a file of stage 0)
            raise ConvertError(f"{os.path.join(path, names[0], FILENAME)}: args.num_layers is {self.num_layers!r}, "
                               f"but its {first_layers} layers x {self.layout.pp} pipeline stages make "
                               f"{first_layers * self.layout.pp}: the file was edited or is corrupt")
        self._open: dict[Coord, TorchFileReader] = {}
        step, groups = None, None
        for coord, file in self.files.items():
            with self._open_file(file) as reader:
                refs = {}
                for key, value in reader.structure["model"].items():
                    name = global_name(key, coord[1], self.layout, self.num_layers)
                    if isinstance(value, TensorRef):
                        refs[name] = value
                    else:
                        self.objects[name] = value
                if "optimizer" in reader.structure:
                    adam, masters = optimizer_parts(reader.structure["optimizer"])
                    for g, group in enumerate(adam["param_groups"]):
                        if "param_names" not in group:
                            raise ConvertError(f"{file}: optimizer param_groups without param_names (a file "
                                               f"not written by megatron-switch): convert with --no-optim")
                        for j, (index, key) in enumerate(zip(group["params"], group["param_names"])):
                            name = global_name(key, coord[1], self.layout, self.num_layers)
                            state = adam["state"].get(index, {})
                            for field, prefix in _STATE_PREFIX.items():
                                if field in state:
                                    refs[prefix + name] = state[field]
                            if step is None and "step" in state:
                                step = reader.load_all(state["step"])
                            if masters is not None and masters[g][j] is not None:
                                refs[MASTER_PREFIX + name] = masters[g][j]
                    groups = groups or [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                                        for g in adam["param_groups"]]
                self.refs[coord] = refs
        self._collect_specs()
        args = head["args"]
        self.common = {
            "iteration": head["iteration"],
            "consumed_train_samples": getattr(args, "consumed_train_samples", 0),
            "scheduler": head.get("opt_param_scheduler"),
            "model_config": {k: getattr(args, k) for k in MODEL_CONFIG_ARGS if getattr(args, k, None) is not None},
            "layout": self.layout.as_dict(),
        }
        if groups is not None:
            self.common["optimizer"] = {"param_groups": groups}
            self.common["optimizer_step"] = float(step) if step is not None else 0.0

    def _open_file(self, file: str) -> TorchFileReader:
        inside(self.path, os.path.relpath(file, self.path), f"{self.path}: the rank file")
        try:
            return TorchFileReader(file, trusted=self.trusted)
        except FileNotFoundError:
            raise ConvertError(f"missing rank file {file}") from None
        except TorchFileError as err:
            raise ConvertError(str(err)) from None

    def _file(self, coord: Coord) -> TorchFileReader:
        """An open rank file; a few stay open (reads go tensor by tensor across files)."""
        if coord not in self._open:
            if len(self._open) >= 4:
                self._open.pop(next(iter(self._open))).close()
            self._open[coord] = self._open_file(self.files[coord])
        return self._open[coord]

    def _collect_specs(self) -> None:
        """Global shape of every tensor from its parts; every part checked against the layout."""
        names = {n for refs in self.refs.values() for n in refs}
        for name in sorted(names):
            where = placement(name, self.layout, self.num_layers)
            first = self.refs[(0, where.stage, 0)].get(name)
            if first is None:
                local = local_name(name, self.layout, self.num_layers)
                raise ConvertError(f"{self.files[(0, where.stage, 0)]}: no {local}, "
                                   f"which other rank files of stage {where.stage} hold")
            shape = list(first.shape)
            if where.axis is not None:
                shape[where.axis] *= where.parts(self.layout)
            spec = TensorSpec(tuple(shape), first.dtype)
            for coord, index in holders(name, spec.shape, self.layout, self.num_layers).items():
                ref = self.refs[coord].get(name)
                expected = tuple(b - a for a, b in index)
                if ref is None:
                    raise ConvertError(f"{self.files[coord]}: no {local_name(name, self.layout, self.num_layers)} "
                                       f"(expected {expected}); the rank file is incomplete")
                if ref.shape != expected or ref.dtype != spec.dtype:
                    raise ConvertError(f"{self.files[coord]}: {local_name(name, self.layout, self.num_layers)} has "
                                       f"shape {ref.shape} {ref.dtype}, the layout {self.layout} needs {expected} "
                                       f"{spec.dtype} (mismatched shape: the files come from different runs "
                                       f"or layouts)")
            self.tensors[name] = spec

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        spec = self.tensors[name]
        index = index or full_index(spec.shape)
        out = torch.empty([b - a for a, b in index], dtype=spec.dtype)
        for coord, part in distinct_parts(name, spec.shape, self.layout, self.num_layers):
            overlap = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(index, part))
            if any(a >= b for a, b in overlap):
                continue
            try:
                local = self._file(coord).materialize(self.refs[coord][name])
            except TorchFileError as err:
                raise ConvertError(str(err)) from None
            block(out, overlap, [a for a, _ in index]).copy_(block(local, overlap, [a for a, _ in part]))
        return out

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def legacy_args(common: dict, layout: Layout) -> argparse.Namespace:
    """Megatron-LM's `args` entry: layout, model shape, progress."""
    return argparse.Namespace(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=1,
        iteration=common.get("iteration", 0), consumed_train_samples=common.get("consumed_train_samples", 0),
        ckpt_format="torch", **common.get("model_config", {}))


def _file_order(name: str):
    """Embedding, layers in order, final norm, output layer (the model's own order)."""
    from megatron_switch.checkpoint.sharding import layer_number

    layer = layer_number(name)
    head = 0 if name.startswith("embedding.") else 2 if layer is None else 1
    return (head, layer or 0, name)


def write_legacy(path: str, source: CheckpointReader, names, common: dict, layout: Layout, num_layers: int,
                 progress) -> None:
    """Write `names` of `source` to the new directory `path`: one file per rank coordinate."""
    os.makedirs(path)
    model_names = sorted((n for n in names if not is_optimizer(n)), key=_file_order)
    optimizer_names = {n for n in names if is_optimizer(n)}
    groups = (common.get("optimizer") or {}).get("param_groups") if optimizer_names else None
    step = torch.tensor(float(common.get("optimizer_step", 0.0)))
    args = legacy_args(common, layout)

    def pending(name: str, index: Index) -> PendingTensor:
        def produce():
            tensor = source.read(name, index)
            progress.update(tensor.numel() * tensor.element_size())
            return tensor
        return PendingTensor(tuple(b - a for a, b in index), source.tensors[name].dtype, produce)

    for coord in layout.coords():
        model, params = {}, []
        for name in model_names:
            index = holders(name, source.tensors[name].shape, layout, num_layers).get(coord)
            if index is not None:
                model[local_name(name, layout, num_layers)] = pending(name, index)
                params.append((name, index))
        for key, value in source.objects.items():
            if placement(key, layout, num_layers).stage == coord[1]:
                model[local_name(key, layout, num_layers)] = value
        state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": common.get("iteration", 0),
                 "model": model, "opt_param_scheduler": common.get("scheduler"),
                 "num_floating_point_operations_so_far": 0}
        if groups is not None:
            state["optimizer"] = _legacy_optimizer(params, optimizer_names, groups, step, layout, num_layers, pending)
        os.makedirs(os.path.dirname(rank_file(path, layout, coord)))
        write_torch_file(rank_file(path, layout, coord), state)


def _legacy_optimizer(params, optimizer_names, groups, step, layout, num_layers, pending) -> dict:
    """Adam's state for the parameters of one rank file, grouped as the trainer groups them
    (weight decay on matrices: group 0 holds tensors of 2+ dimensions, group 1 the rest)."""
    adam_groups = [dict(g, params=[], param_names=[]) for g in groups]
    state, masters = {}, [[] for _ in groups]
    with_state = [(n, i) for n, i in params if "optimizer.state.exp_avg." + n in optimizer_names]
    for index_in_file, (name, index) in enumerate(with_state):
        g = 0 if len(groups) == 1 or len(index) > 1 else 1
        adam_groups[g]["params"].append(index_in_file)
        adam_groups[g]["param_names"].append(local_name(name, layout, num_layers))
        state[index_in_file] = {"step": step.clone(), "exp_avg": pending("optimizer.state.exp_avg." + name, index),
                                "exp_avg_sq": pending("optimizer.state.exp_avg_sq." + name, index)}
        master = MASTER_PREFIX + name
        masters[g].append(pending(master, index) if master in optimizer_names else None)
    adam = {"state": state, "param_groups": adam_groups}
    if any(m is not None for group in masters for m in group):
        return {"optimizer": adam, "fp32_from_fp16_params": masters}
    return adam

