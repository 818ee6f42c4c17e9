"""Switch statistics into Megatron-LM's MoE log (megatron-core's aux-loss tracker).

A forward hook on each SwitchMLP adds, per training forward, to the tracker slot of its layer:
`load_balancing_loss` and `z_loss` without their coefficients (as Megatron's own router logs
them), `switch_dropped_fraction` (share of the routing group's tokens without a slot) and
`switch_max_load` (busiest expert's tokens / mean tokens per expert; 1.0 is perfect balance).
Megatron-LM's training log prints the mean over MoE layers and, with --moe-per-layer-logging,
per layer to TensorBoard/W&B. It reduces across pipeline stages and averages over data-parallel
replicas only the names it tracks: the two Switch names join them with patches/ applied.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_switch.layer import on_training_stats

SWITCH_TRACK_NAMES = ("switch_dropped_fraction", "switch_max_load")


def switch_log_values(mlp) -> dict:
    """name -> scalar tensor of one SwitchMLP's last forward, as logged (see module docstring)."""
    stats, switch = mlp.last_stats, mlp.switch
    load = stats.tokens_per_expert.float()
    values = {"switch_dropped_fraction": stats.dropped_fraction.float(),
              "switch_max_load": load.max() / load.mean().clamp_min(1e-9)}
    if switch.aux_loss_coeff > 0:
        values["load_balancing_loss"] = stats.aux_loss.float() / switch.aux_loss_coeff
    if switch.z_loss_coeff > 0:
        values["z_loss"] = stats.z_loss.float() / switch.z_loss_coeff
    return values


def report_switch_stats(mlp, config: TransformerConfig, *, weight: float = 1.0,
                        num_slots: int = 0) -> torch.utils.hooks.RemovableHandle:
    """Hook `mlp` (a SwitchMLP) so each training forward adds its values to Megatron's tracker,
    in the slot of its layer number among `num_slots` (default config.num_layers).

    weight scales the values (T5: 1/2, the encoder and decoder layers of one depth share a slot).
    """
    def record(module, stats):  # as megatron's router records: each training micro-batch once
        avg_group = (parallel_state.get_data_parallel_group()
                     if parallel_state.model_parallel_is_initialized() else None)
        for name, value in switch_log_values(module).items():
            save_to_aux_losses_tracker(name, value * weight, module.layer_number,
                                       num_slots or config.num_layers, avg_group=avg_group)

    return on_training_stats(mlp, record)
