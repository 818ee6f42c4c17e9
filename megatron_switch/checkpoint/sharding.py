"""Where each logical tensor of a Switch GPT or Switch T5 lives in a (TP, PP, EP) layout.

The rules are those of the model's `sharded_state_dict` (megatron-core's GPT and T5 layers and
`SwitchMLP`); tests check them against the model itself:
- tensor parallel, split along one axis into TP equal blocks: column-parallel `linear_qkv`, T5's
  cross-attention `linear_q` and `linear_kv`, and dense `linear_fc1` (weight and bias, axis 0),
  row-parallel `linear_proj` and dense `linear_fc2` weights (axis 1), the vocabulary axis of
  `embedding.word_embeddings.weight` and `output_layer.weight` (T5: also `lm_head.output_layer.weight`);
- expert parallel: `mlp.experts.*` banks `[E, ...]` split along the expert axis into EP blocks
  (expert tensor parallelism is 1: experts are never split over TP);
- everything else (norms, row-parallel biases, position embeddings, T5's relative position bias
  tables, routers, `_extra_state`) is replicated.
Pipeline stage p of PP holds layers [p L/PP, (p+1) L/PP) (Megatron numbers them from 0 on each
stage in legacy files), the embeddings on stage 0 and the final norm and output layer on the last.
T5 (model_config "model": "t5") has one stage: megatron-core's T5 splits no stack over pipeline stages.
Optimizer tensors (`optimizer.state.exp_avg.<key>`, ...) live exactly where their parameter lives.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from megatron_switch.checkpoint.contents import ConvertError, Index, param_key
from megatron_switch.parallel import Layout, LayoutError, validate_layout

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_T5_FIRST_STAGE = ("encoder.layers.", "encoder.final_layernorm.", "encoder_relative_pos_emb.",
                   "decoder_relative_pos_emb.")  # T5 has one stage
_TP_AXIS = (("embedding.word_embeddings.weight", 0), ("output_layer.weight", 0),
            (".linear_qkv.weight", 0), (".linear_qkv.bias", 0), (".linear_q.weight", 0),
            (".linear_kv.weight", 0), (".linear_fc1.weight", 0),
            (".linear_fc1.bias", 0), (".linear_proj.weight", 1), (".linear_fc2.weight", 1))
_REPLICATED = ("layer_norm_weight", "layer_norm_bias", "layernorm.weight", "layernorm.bias",
               ".linear_proj.bias", ".linear_fc2.bias", "embedding.position_embeddings.weight",
               ".router.weight", "._extra_state", ".relative_attention_bias.weight")
EXPERTS = ".mlp.experts."

Coord = tuple[int, int, int]  # (tp rank, pp rank, ep rank)


@dataclasses.dataclass(frozen=True)
class Placement:
    """How one logical tensor is laid out: stage, and at most one split axis."""

    stage: int
    axis: int | None = None
    split_over: str | None = None  # "tp" or "ep"

    def parts(self, layout: Layout) -> int:
        return {"tp": layout.tp, "ep": layout.ep}.get(self.split_over, 1)


def model_metadata() -> dict:
    """Sharded-state-dict metadata, fresh per call: megatron-core adds the current data-parallel
    group to it in place. Switch and dense layers alternate, so layers are keyed one by one."""
    return {"non_homogeneous_layers": True}


def layer_number(name: str) -> int | None:
    match = _LAYER.match(param_key(name))
    return int(match.group(1)) if match else None


def placement(name: str, layout: Layout, num_layers: int) -> Placement:
    """Placement of `name` (a model, optimizer or object key) in `layout`."""
    key = param_key(name)
    layer = layer_number(key)
    if layer is not None:
        stage = layer // (num_layers // layout.pp)
    elif key.startswith(("embedding.", *_T5_FIRST_STAGE)):
        stage = 0
    elif key.startswith(("decoder.final_layernorm.", "output_layer.", "lm_head.")):
        stage = layout.pp - 1
    else:
        raise ConvertError(f"unknown checkpoint key {name!r}: not part of a Switch GPT or T5, so its placement "
                           f"across layouts is unknown")
    if EXPERTS in key:
        return Placement(stage, 0, "ep")
    for suffix, axis in _TP_AXIS:
        if key.endswith(suffix):
            return Placement(stage, axis, "tp")
    if key.endswith(_REPLICATED):
        return Placement(stage)
    raise ConvertError(f"unknown checkpoint key {name!r}: its tensor-parallel split is unknown")


def local_name(name: str, layout: Layout, num_layers: int) -> str:
    """`name` with its layer renumbered from 0 on its pipeline stage (legacy files)."""
    layer = layer_number(name)
    if layer is None:
        return name
    per_stage = num_layers // layout.pp
    key = param_key(name)
    local_key = _LAYER.sub(f"decoder.layers.{layer % per_stage}.", key, count=1)
    return name[: len(name) - len(key)] + local_key


def global_name(name: str, stage: int, layout: Layout, num_layers: int) -> str:
    """Inverse of `local_name` for a key read from stage `stage`."""
    layer = layer_number(name)
    if layer is None:
        return name
    key = param_key(name)
    global_key = _LAYER.sub(f"decoder.layers.{layer + stage * (num_layers // layout.pp)}.", key, count=1)
    return name[: len(name) - len(key)] + global_key


def part_index(shape: tuple[int, ...], where: Placement, part: int, layout: Layout) -> Index:
    index = [(0, n) for n in shape]
    if where.axis is not None:
        size = shape[where.axis] // where.parts(layout)
        index[where.axis] = (part * size, (part + 1) * size)
    return tuple(index)


def holders(name: str, shape: tuple[int, ...], layout: Layout, num_layers: int) -> dict[Coord, Index]:
    """Every rank coordinate whose file holds a part of `name`, and which part."""
    where = placement(name, layout, num_layers)
    out = {}
    for t, p, e in layout.coords():
        if p != where.stage:
            continue
        part = {"tp": t, "ep": e}.get(where.split_over, 0)
        out[(t, p, e)] = part_index(shape, where, part, layout)
    return out


def distinct_parts(name: str, shape: tuple[int, ...], layout: Layout, num_layers: int) -> list[tuple[Coord, Index]]:
    """One holder for each distinct part of `name` (the lowest other coordinates)."""
    where = placement(name, layout, num_layers)
    parts = []
    for part in range(where.parts(layout)):
        coord = (part if where.split_over == "tp" else 0, where.stage, part if where.split_over == "ep" else 0)
        parts.append((coord, part_index(shape, where, part, layout)))
    return parts


def count_layers(names) -> int:
    layers = {layer_number(n) for n in names} - {None}
    return max(layers) + 1 if layers else 0


def check_layout(layout: Layout, shapes: dict[str, tuple[int, ...]], model_config: dict[str, Any]) -> None:
    """Raise LayoutError/ConvertError if the model cannot be laid out as `layout`; says what would."""
    num_layers = int(model_config.get("num_layers") or count_layers(shapes))
    experts = [s[0] for n, s in shapes.items() if EXPERTS in n]
    num_experts = model_config.get("num_experts") or (experts[0] if experts else None)
    try:
        validate_layout(layout.min_world_size, layout.tp, layout.pp, layout.ep, num_experts)
    except LayoutError as err:
        raise LayoutError(f"target layout {layout}: {err}") from None
    if model_config.get("model") == "t5" and layout.pp > 1:
        raise LayoutError(f"target layout {layout}: megatron-core's T5 splits no stack over pipeline stages: "
                          f"use --target-pp 1")
    if num_layers % layout.pp:
        fits = [d for d in range(1, num_layers + 1) if num_layers % d == 0 and d <= layout.pp]
        raise LayoutError(f"target layout {layout}: {num_layers} layers do not split into {layout.pp} equal "
                          f"pipeline stages: use --target-pp {max(fits)}")
    heads = model_config.get("num_attention_heads")
    if heads and heads % layout.tp:
        raise LayoutError(f"target layout {layout}: {heads} attention heads are not divisible by "
                          f"--target-tp {layout.tp}")
    for name, shape in shapes.items():
        where = placement(name, layout, num_layers)
        if where.axis is not None and shape[where.axis] % where.parts(layout):
            flag = "--target-tp" if where.split_over == "tp" else "--target-ep"
            hint = (" (the padded vocabulary: train with a --make-vocab-size-divisible-by that makes it a "
                    "multiple of 128 x TP)" if "embedding" in name or "output_layer" in name else "")
            raise LayoutError(f"target layout {layout}: {name} has {shape[where.axis]} entries on axis "
                              f"{where.axis}, not divisible by {flag} {where.parts(layout)}{hint}")
