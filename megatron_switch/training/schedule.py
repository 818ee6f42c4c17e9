"""Forward and backward over the micro-batches of one step, with or without pipeline stages.

On CUDA, Megatron's own schedules drive pipeline parallelism; they allocate on the GPU, so on CPU
this module runs the same model through a GPipe schedule over gloo send/recv: every stage runs all
micro-batches forward (receiving activations from the previous stage, sending to the next), then
all backward in the same order (receiving output gradients, sending input gradients).
Loss per micro-batch: mean over its unmasked tokens; the step averages micro-batches, and
`MoEAuxLossAutoScaler` scales the Switch losses' gradients by the same 1 / micro-batches.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler


def _model_forward(model, batch: Dict[str, torch.Tensor]):
    loss_per_token = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    if not parallel_state.is_pipeline_last_stage():
        return loss_per_token  # hidden states [s, b, h] for the next stage
    mask = batch["loss_mask"].float()
    return (loss_per_token.float() * mask).sum() / mask.sum()


def _activation_shape(args, micro_batch_size: int):
    return (args.seq_length, micro_batch_size, args.hidden_size)


def forward_backward(model, batches: List[Dict[str, torch.Tensor]], args, forward_only: bool = False
                     ) -> Optional[torch.Tensor]:
    """Runs every micro-batch; returns the mean loss on the last stage (None elsewhere)."""
    num_micro = len(batches)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / num_micro, device=batches[0]["tokens"].device))
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    inputs, outputs, losses = [], [], []
    for batch in batches:
        received = None
        if pipelined and not first:
            received = torch.empty(_activation_shape(args, batch["tokens"].shape[0]), dtype=dtype,
                                   device=batch["tokens"].device)
            dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            received.requires_grad_(not forward_only)
            model.set_input_tensor(received)
        with torch.set_grad_enabled(not forward_only):
            output = _model_forward(model, batch)
        if pipelined and not last:
            dist.send(output.detach().contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        if last:
            losses.append(output.detach())
        if not forward_only:
            if not pipelined:  # free each micro-batch's graph as soon as possible
                (output / num_micro).backward()
            else:
                inputs.append(received)
                outputs.append(output)
    if pipelined and not forward_only:
        for received, output in zip(inputs, outputs):
            if last:
                (output / num_micro).backward()
            else:
                grad = torch.empty_like(output)
                dist.recv(grad, src=parallel_state.get_pipeline_model_parallel_next_rank())
                output.backward(grad)
            if not first:
                dist.send(received.grad.contiguous(), dst=parallel_state.get_pipeline_model_parallel_prev_rank())
    return torch.stack(losses).mean() if last else None
