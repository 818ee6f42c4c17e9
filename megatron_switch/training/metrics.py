"""What a run reports: per-interval lines, a metrics.jsonl, TensorBoard scalars, and at the end a
loss-curve PNG and an expert-load heatmap PNG (layers x experts, share of routed tokens).

The plots need matplotlib (the `plots` extra); without it they are skipped with one line that says
so, and everything else is written as usual."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_switch.ops.collectives import comm_device
from megatron_switch.layer import SwitchMLP, SwitchStats, on_training_stats
from megatron_switch.specs.t5_model import STACKS, SwitchT5Model, switch_layers_by_stack


def is_reporting_rank() -> bool:
    """The rank that prints: last pipeline stage, first tensor- and data-parallel rank."""
    return (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def layer_rows(model: torch.nn.Module, num_layers: int) -> Tuple[Dict[int, int], List[str]]:
    """({id(Switch layer): its row}, a label per row): GPT's rows are its global layers (the same on
    every pipeline stage); an encoder-decoder's are the encoder's layers, then the decoder's (their
    layer numbers restart in each stack)."""
    t5 = next((m for m in model.modules() if isinstance(m, SwitchT5Model)), None)
    if t5 is None:
        return ({id(m): m.layer_number - 1 for m in model.modules() if isinstance(m, SwitchMLP)},
                [str(n) for n in range(1, num_layers + 1)])
    offsets = {"encoder": 0, "decoder": t5.settings.encoder_layers}
    rows = {id(layer): offsets[stack] + number - 1
            for stack, layers in switch_layers_by_stack(t5).items() for number, layer in layers.items()}
    labels = [f"{stack[:3]} {n}" for stack in STACKS for n in range(1, t5.settings.num_layers(stack) + 1)]
    return rows, labels


class SwitchStatsAccumulator:
    """Sums each Switch layer's statistics over every training micro-batch of a logging interval
    (a forward hook on each Switch layer; evaluation forwards and the no-grad first pass of activation
    recomputation are not counted, so each micro-batch counts once). One row per layer (`layer_rows`)."""

    def __init__(self, model: torch.nn.Module, num_layers: int, num_experts: int):
        self.layers = [m for m in model.modules() if isinstance(m, SwitchMLP)]
        self.rows, self.row_labels = layer_rows(model, num_layers)
        self.num_experts = max(num_experts, 1)
        self.reset()
        for layer in self.layers:
            on_training_stats(layer, self._record)

    def reset(self) -> None:
        # rows: see layer_rows; columns: aux, z, dropped fraction, count, then E loads.
        # Kept where the statistics are (the GPU under NCCL): recording never waits for the device.
        self.table = torch.zeros(len(self.row_labels), 4 + self.num_experts, dtype=torch.float64,
                                 device=comm_device())

    def _record(self, layer: SwitchMLP, stats: SwitchStats) -> None:
        row = self.table[self.rows[id(layer)]]
        row[:3] += torch.stack([stats.aux_loss, stats.z_loss, stats.dropped_fraction]).double()
        row[3] += 1
        row[4:] += stats.tokens_per_expert.double()

    def reduce(self) -> torch.Tensor:
        """All ranks: the table summed over pipeline stages and data-parallel replicas."""
        table = self.table.clone()
        for group in (parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_data_parallel_group()):
            dist.all_reduce(table, group=group)
        return table.cpu()


class Reporter:
    def __init__(self, args, row_labels: Optional[List[str]] = None):
        self.args = args
        self.row_labels = row_labels
        self.enabled = is_reporting_rank()
        self.history: List[Dict] = []
        self.load = None
        self.writer = None
        self.plots_dir = args.plots_dir or os.path.join(args.save or ".", "plots")
        if self.enabled:
            os.makedirs(self.plots_dir, exist_ok=True)
            if args.tensorboard_dir:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(args.tensorboard_dir)

    def log(self, iteration: int, lm_loss: float, table: torch.Tensor, lr: float, tokens_per_s: float,
            grad_norm: float, valid_loss: Optional[float] = None) -> None:
        switch_rows = table[table[:, 3] > 0]
        counts = switch_rows[:, 3:4].clamp(min=1)
        per_layer = switch_rows[:, :3] / counts
        aux, z = float(per_layer[:, 0].sum()), float(per_layer[:, 1].sum())
        dropped = float(per_layer[:, 2].mean()) if len(per_layer) else 0.0
        load = switch_rows[:, 4:]
        self.load = load if self.load is None else self.load + load
        self.load_layers = [self.row_labels[int(i)] if self.row_labels else str(int(i) + 1)
                            for i in torch.nonzero(table[:, 3] > 0).flatten()]
        record = dict(iteration=iteration, lm_loss=lm_loss, aux_loss=aux, z_loss=z, dropped_fraction=dropped,
                      lr=lr, tokens_per_s=tokens_per_s, grad_norm=grad_norm)
        if valid_loss is not None:
            record["valid_lm_loss"] = valid_loss
        if not self.enabled:
            return
        self.history.append(record)
        line = (f" iteration {iteration:7d}/{self.args.train_iters:7d} | lm loss {lm_loss:.4f} | "
                f"aux loss {aux:.4e} | z loss {z:.4e} | dropped {dropped:.3f} | "
                f"tokens/s {tokens_per_s:,.0f} | lr {lr:.3e} | grad norm {grad_norm:.3f}")
        if valid_loss is not None:
            line += f" | valid lm loss {valid_loss:.4f}"
        print(line, flush=True)
        with open(os.path.join(self.plots_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer:
            for key, value in record.items():
                if key != "iteration":
                    self.writer.add_scalar(key, value, iteration)

    def finish(self) -> None:
        if not self.enabled or not self.history:
            return
        if self.writer:
            self.writer.close()
        try:
            import matplotlib
        except ImportError:
            print(f" metrics written to {self.plots_dir}/metrics.jsonl; plots skipped: matplotlib is not "
                  f"installed (pip install matplotlib, or megatron-switch[plots])", flush=True)
            return

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        its = [r["iteration"] for r in self.history]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(its, [r["lm_loss"] for r in self.history], label="train lm loss")
        valid = [(r["iteration"], r["valid_lm_loss"]) for r in self.history if "valid_lm_loss" in r]
        if valid:
            ax.plot(*zip(*valid), "o-", label="valid lm loss")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_title(f"Switch {getattr(self.args, 'model', 'gpt').upper()} training")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.plots_dir, "loss.png"), dpi=120)
        plt.close(fig)
        if self.load is not None and len(self.load):
            share = (self.load / self.load.sum(1, keepdim=True).clamp(min=1)).numpy()
            fig, ax = plt.subplots(figsize=(max(5, share.shape[1] * 0.4), max(2.5, share.shape[0] * 0.6)))
            image = ax.imshow(share, aspect="auto", cmap="viridis")
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            ax.set_yticks(range(len(self.load_layers)), self.load_layers)
            ax.set_title("share of routed tokens (uniform = %.3f)" % (1.0 / share.shape[1]))
            fig.colorbar(image, ax=ax)
            fig.tight_layout()
            fig.savefig(os.path.join(self.plots_dir, "expert_load.png"), dpi=120)
            plt.close(fig)
        print(f" plots and metrics written to {self.plots_dir}", flush=True)
