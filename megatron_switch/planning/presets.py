"""Named presets: the table in presets.toml, read into ModelSpec and training defaults.

The table is data; this module only reads and checks it. `get_preset(name)` returns a `Preset`
(model shape, the sbatch command's training defaults, the paper's parameter count where there is
one) and raises `PresetError` naming the known presets for an unknown name.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import tomllib

from megatron_switch.planning.model import ModelSpec, ModelSpecError

TRAINING_FIELDS = ("micro_batch_size", "global_batch_size", "train_iters", "lr", "lr_warmup_iters",
                   "save_interval", "tokenizer_type")


class PresetError(ValueError):
    """An unknown or malformed preset; the message lists what exists."""


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: ModelSpec
    training: dict[str, object]
    paper_parameters: float | None = None


@functools.cache
def load_presets() -> dict[str, Preset]:
    """Every preset of presets.toml, checked: unknown fields or bad shapes raise PresetError."""
    text = importlib.resources.files("megatron_switch.planning").joinpath("presets.toml").read_text()
    table = tomllib.loads(text)
    model_fields = {f.name for f in dataclasses.fields(ModelSpec)}
    presets = {}
    for name, row in table.items():
        unknown = set(row.get("model", {})) - model_fields
        unknown_training = set(row.get("training", {})) - set(TRAINING_FIELDS)
        if unknown or unknown_training:
            raise PresetError(f"preset {name}: unknown fields {sorted(unknown | unknown_training)}")
        try:
            model = ModelSpec(**row["model"])
        except (KeyError, TypeError, ModelSpecError) as err:
            raise PresetError(f"preset {name}: {err}") from None
        presets[name] = Preset(name, row.get("description", ""), model, dict(row.get("training", {})),
                               row.get("paper_parameters"))
    return presets


def get_preset(name: str) -> Preset:
    presets = load_presets()
    if name not in presets:
        raise PresetError(f"unknown preset {name!r}: choose one of {', '.join(presets)}")
    return presets[name]
