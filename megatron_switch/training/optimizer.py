"""The trainer's optimizer step: AdamW on float32 master weights, with gradients reduced one of two ways.

- `--ddp-impl megatron` (the default, on GPU/NCCL and on CPU/gloo): megatron-core's
  DistributedDataParallel wraps the model. Gradients accumulate over micro-batches in its contiguous
  float32 buffers (`main_grad`); `finalize_model_grads` reduces dense gradients over data parallel and
  expert gradients over expert-data parallel, both scaled by 1 / DP, with the layer-norm (sequence
  parallel) and embedding (pipeline) reductions Megatron-LM does; `--overlap-grad-reduce` starts each
  bucket's reduction during backward. On CPU `compat.apply_cpu_shims` puts its buffers on the CPU.
- `--ddp-impl local`: `gradients.reduce_gradients`, the same arithmetic on float32 copies of `.grad`
  (micro-batches accumulate in `.grad`, so in bf16 under --bf16): a cross-check of megatron's.

Either way the masters are the float32 parameters themselves, or float32 copies of the bf16 ones
(--bf16; the router is float32 already), and one global gradient norm covers every parallel dimension.

`--use-distributed-optimizer` (ZeRO-1, after either reduction): each parameter is owned by one rank
of its reduction group (`ownership.ParameterOwners`), and only the owner keeps its float32 master and
Adam's moments, so the optimizer state per rank shrinks by about DP (experts: expert-DP). Sharded is
the optimizer state only: weights and gradients stay whole on every rank, and gradients are still
all-reduced in full (not reduce-scattered), so the norm and clipping are those of the plain step.
After AdamW each owner broadcasts its updated parameters. With DP = 1 it is the plain optimizer.
(megatron-core's own DistributedOptimizer, which reduce-scatters into sharded buffers, is not used.)
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_switch.comm import comm_device
from megatron_switch.training.gradients import reduce_gradients
from megatron_switch.training.ownership import ParameterOwners


def _sum_of_squares(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared 2-norm of all `grads` together, as a float64 [1] tensor (float32 per-tensor norms,
    multi-tensor kernels where the device has them)."""
    if not grads:
        return torch.zeros(1, dtype=torch.float64, device=comm_device())
    return torch.nn.utils.get_total_norm(grads, 2.0).double().square().reshape(1).to(comm_device())


def global_grad_norm(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor]) -> float:
    """Norm of the whole model's gradient (`grads[i]` is the reduced gradient of `params[i]`):
    tensor-parallel duplicates counted once, experts once per expert-parallel group, every pipeline
    stage included."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dense, expert = [], []
    for p, grad in zip(params, grads):
        if getattr(p, "shared", False):
            continue  # the last stage's copy of tied embeddings: the first stage counts them
        if not getattr(p, "allreduce", True):
            expert.append(grad)
        elif getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            dense.append(grad)
    dense, expert = _sum_of_squares(dense), _sum_of_squares(expert)
    dist.all_reduce(dense, group=parallel_state.get_model_parallel_group())
    dist.all_reduce(expert, group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    return math.sqrt(float((dense + expert).item()))


def _param_groups(params, weight_decay: float):
    """Weight decay on matrices only (not on biases and norm weights)."""
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0, "lr_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0, "lr_mult": 1.0}]


class Optimization:
    """The model as the schedule runs it (`model`), as checkpoints and statistics see it (`module`),
    and the step: `zero_grad()`, backward by the schedule, then `step()` -> global gradient norm.

    `optimizer` (a torch AdamW whose param_groups hold the masters), `params_in_optimizer_order`
    (the model parameter of each master) and `scheduler` (Megatron's learning-rate and weight-decay
    schedule from the --lr* flags) are what checkpoints save and restore. `params` are all trainable
    parameters; `owned` those this rank updates (all of them, or its share under
    --use-distributed-optimizer, where `owners` says whose each is and `optimizer.data_parallel_sharded`
    tells checkpoints that this rank's state is the only copy); `masters` the float32 masters of `owned`.
    """

    def __init__(self, module: torch.nn.Module, args, megatron_ddp: bool):
        self.module, self.args, self.megatron_ddp = module, args, megatron_ddp
        self.model = module
        if megatron_ddp:
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
                use_distributed_optimizer=False, check_for_nan_in_grad=False)
            self.model = DistributedDataParallel(module.config, ddp_config, module)
            # The schedule accumulates every micro-batch's gradient before the reduction starts,
            # as Megatron-LM configures it.
            module.config.no_sync_func = self.model.no_sync
        self.params: List[torch.nn.Parameter] = [p for p in module.parameters() if p.requires_grad]
        self.owners = ParameterOwners(self.params) if args.use_distributed_optimizer else None
        self.owned = self.owners.owned if self.owners is not None else self.params
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_()
                        for p in self.owned]
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.masters, args.weight_decay),
            lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, fused=True)
        self.optimizer.data_parallel_sharded = self.owners is not None
        model_of_master = {id(m): p for m, p in zip(self.masters, self.owned)}
        self.params_in_optimizer_order = [model_of_master[id(m)] for g in self.optimizer.param_groups
                                          for m in g["params"]]
        index = {id(p): i for i, p in enumerate(self.params)}
        self._owned_index = [index[id(p)] for p in self.owned]
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr,
            min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters,
            lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
            wd_incr_steps=args.train_iters, wd_incr_style="constant")

    def zero_grad(self) -> None:
        if self.megatron_ddp:
            self.model.zero_grad_buffer()
        for p in self.params + self.masters:
            p.grad = None

    def _reduced_gradients(self) -> List[torch.Tensor]:
        """The float32 gradient of each of `params`, reduced over data parallel (and scaled by 1 / DP)."""
        if self.megatron_ddp:
            from megatron.core.distributed import finalize_model_grads

            finalize_model_grads([self.model])
            return [p.main_grad for p in self.params]  # float32, reduced and scaled by megatron's DDP
        grads = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) if p.grad is None else p.grad.float()
                 for p in self.params]  # a float32 .grad is used in place
        reduce_gradients(self.params, grads, sequence_parallel=self.args.sequence_parallel)
        return grads

    def step(self) -> float:
        """Reduce, clip to --clip-grad, AdamW on this rank's masters, copy them back, and (sharded)
        broadcast the owners' parameters; returns the gradient norm."""
        grads = self._reduced_gradients()
        grad_norm = global_grad_norm(self.params, grads)
        for master, i in zip(self.masters, self._owned_index):
            master.grad = grads[i]
        clip = self.args.clip_grad
        if clip > 0 and grad_norm > clip:
            for master in self.masters:
                master.grad.mul_(clip / (grad_norm + 1e-6))
        self.optimizer.step()
        with torch.no_grad():
            for master, p in zip(self.masters, self.owned):
                if master is not p:
                    p.copy_(master)
        if self.owners is not None:
            self.owners.broadcast()
        return grad_norm
