"""Forward and backward over the micro-batches of one step, through megatron-core's own schedules.

`megatron.core.pipeline_parallel.get_forward_backward_func()` picks the schedule Megatron-LM uses:
no pipelining (PP = 1: each micro-batch forward then backward, its graph freed before the next) or
1F1B (PP > 1: warm-up forwards, steady one-forward-one-backward, cool-down backwards, activations
exchanged with the neighbouring stages by point-to-point sends). The same code runs on GPUs (NCCL)
and on CPUs (gloo; `compat.enable_cpu_support` maps the schedules' few CUDA-only allocations to the CPU).

Loss per micro-batch: the sum of its unmasked tokens' losses and their count; the schedule divides
by the count and by the number of micro-batches (Megatron's per-micro-batch mean), and
`MoEAuxLossAutoScaler` scales the Switch losses' gradients by the same 1 / micro-batches.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler


def masked_loss(loss_mask: torch.Tensor, loss_per_token: torch.Tensor):
    """Megatron's three-value loss: (sum over unmasked tokens, their count, values to report)."""
    mask = loss_mask.float()
    total = (loss_per_token.float() * mask).sum()
    count = mask.sum()
    return total, count.int(), {"lm_loss": (total / count.clamp(min=1)).detach()}


def gpt_forward_step(batches, model):
    batch = next(batches)
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    return output, partial(masked_loss, batch["loss_mask"])


def forward_backward(model, batches: List[Dict[str, torch.Tensor]], args, forward_only: bool = False,
                     forward_step=gpt_forward_step) -> Optional[torch.Tensor]:
    """Runs every micro-batch of one step on this stage; returns the mean of the micro-batches'
    losses on the last pipeline stage, None on the others. forward_step: the model's
    (`training.objectives`; GPT's by default)."""
    num_micro = len(batches)
    loss_mask = batches[0]["loss_mask"]
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / num_micro, device=loss_mask.device))
    reported = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=num_micro, seq_length=args.seq_length, micro_batch_size=loss_mask.shape[0],
        forward_only=forward_only)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.stack([r["lm_loss"] for r in reported]).mean()
