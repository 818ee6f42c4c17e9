"""The trainer's optimizer step: AdamW on float32 master weights, with gradients reduced one of two ways.

- `--ddp-impl megatron` (the default, on GPU/NCCL and on CPU/gloo): megatron-core's
  DistributedDataParallel wraps the model. Gradients accumulate over micro-batches in its contiguous
  float32 buffers (`main_grad`); `finalize_model_grads` reduces dense gradients over data parallel and
  expert gradients over expert-data parallel, both scaled by 1 / DP, with the layer-norm (sequence
  parallel) and embedding (pipeline) reductions Megatron-LM does; `--overlap-grad-reduce` starts each
  bucket's reduction during backward. On CPU `compat.enable_cpu_support` puts its buffers on the CPU.
- `--ddp-impl local`: `gradients.reduce_gradients`, the same arithmetic by hand: a cross-check of
  megatron's. Micro-batches accumulate in float32 here too: a bf16 parameter's `.grad` is added into
  a float32 `main_grad` as soon as autograd has produced it (a post-accumulate hook), then dropped.

Either way the masters are the float32 parameters themselves, or float32 copies of the bf16 ones
(--bf16; the router is float32 already), and one global gradient norm covers every parallel dimension.

`--use-distributed-optimizer` (ZeRO-1): the float32 masters and Adam's moments are split over the
reduction group (dense: data parallel, experts: expert-data parallel), so the optimizer state per
rank shrinks by about that size; weights and gradient buffers stay whole. Each rank updates its
*pieces* (parameter, start, end of the flattened parameter; `ownership.py` decides):
- after megatron-core's DDP, built in its distributed-optimizer mode: the pieces in this rank's shard
  of each bucket. Gradients are reduce-scattered (each rank receives its shard), the norm is summed
  from the shards, and after AdamW the parameters are all-gathered from the shards: megatron-core's
  DistributedOptimizer's communication, through megatron-core's own buffers and collectives;
- after the local reduction: whole parameters, each owned by one rank, which broadcasts it after
  AdamW (gradients are all-reduced in full there).
With a reduction group of one rank it is the plain optimizer. Checkpoints hold the same global
tensors either way (checkpointing.py).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_switch.ops.collectives import comm_device
from megatron_switch.training.gradients import reduce_gradients
from megatron_switch.training.ownership import ParameterOwners, ddp_shard_pieces, piece_of


def _sum_of_squares(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared 2-norm of all `grads` together, as a float64 [1] tensor (float32 per-tensor norms,
    multi-tensor kernels where the device has them)."""
    if not grads:
        return torch.zeros(1, dtype=torch.float64, device=comm_device())
    return torch.nn.utils.get_total_norm(grads, 2.0).double().square().reshape(1).to(comm_device())


def global_grad_norm(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor],
                     sharded: bool = False) -> float:
    """Norm of the whole model's gradient (`grads[i]` is the reduced gradient of `params[i]`, or,
    `sharded`, of this rank's piece of it, the pieces of the data-parallel ranks together making up
    each parameter once): tensor-parallel duplicates counted once, experts once per expert-parallel
    group, every pipeline stage included."""
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
    if sharded:  # every rank holds distinct pieces: one sum over all of them
        total = dense + expert
        dist.all_reduce(total)
        return math.sqrt(float(total.item()))
    dist.all_reduce(dense, group=parallel_state.get_model_parallel_group())
    dist.all_reduce(expert, group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    return math.sqrt(float((dense + expert).item()))


def _master(param: torch.nn.Parameter, start: int, end: int) -> torch.Tensor:
    """The float32 master of elements start..end of the flattened `param`: the parameter itself
    (whole, float32), a view of it (a float32 piece), or a float32 copy (bf16)."""
    if start == 0 and end == param.numel():
        return param if param.dtype == torch.float32 else param.detach().float().requires_grad_()
    piece = param.detach().view(-1)[start:end]
    return piece if param.dtype == torch.float32 else piece.float()


def _accumulate_in_float32(param: torch.nn.Parameter) -> None:
    """Post-accumulate hook of a bf16 parameter under the local reduction: this micro-batch's
    gradient goes into the float32 `main_grad`, and `.grad` starts from nothing for the next one."""
    param.main_grad.add_(param.grad)
    param.grad = None


def _param_groups_of_pieces(masters, pieces, weight_decay: float):
    """Weight decay on matrices only (not on biases and norm weights), judged by the parameter."""
    decay = [m for m, (p, _, _) in zip(masters, pieces) if p.dim() > 1]
    no_decay = [m for m, (p, _, _) in zip(masters, pieces) if p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0, "lr_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0, "lr_mult": 1.0}]


class Optimization:
    """The model as the schedule runs it (`model`), as checkpoints and statistics see it (`module`),
    and the step: `zero_grad()`, backward by the schedule, then `step()` -> global gradient norm.

    `optimizer` (a torch AdamW whose param_groups hold the masters), `params_in_optimizer_order`
    (the model parameter of each master) and `scheduler` (Megatron's learning-rate and weight-decay
    schedule from the --lr* flags) are what checkpoints save and restore. `params` are all trainable
    parameters; `pieces` the (parameter, start, end) this rank updates: every parameter whole, or its
    share under --use-distributed-optimizer (`optimizer.param_pieces` then tells checkpoints which
    elements each master holds: the state of the others is another rank's); `masters` their float32
    masters.
    """

    def __init__(self, module: torch.nn.Module, args, megatron_ddp: bool):
        self.module, self.args, self.megatron_ddp = module, args, megatron_ddp
        self.model = module
        sharded = args.use_distributed_optimizer
        if megatron_ddp:
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
                use_distributed_optimizer=sharded, check_for_nan_in_grad=False)
            self.model = DistributedDataParallel(module.config, ddp_config, module)
            # The schedule accumulates every micro-batch's gradient before the reduction starts,
            # as Megatron-LM configures it.
            module.config.no_sync_func = self.model.no_sync
        self.params: List[torch.nn.Parameter] = [p for p in module.parameters() if p.requires_grad]
        # Under the local reduction, the bf16 parameters accumulate micro-batches in a float32 main_grad.
        self._float32_accumulated = [] if megatron_ddp else [p for p in self.params if p.dtype != torch.float32]
        for p in self._float32_accumulated:
            p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            p.register_post_accumulate_grad_hook(_accumulate_in_float32)
        index = {id(p): i for i, p in enumerate(self.params)}
        self.owners = ParameterOwners(self.params) if sharded and not megatron_ddp else None
        if self._sliced:
            pieces = sorted(ddp_shard_pieces(self.model), key=lambda piece: (index[id(piece[0])], piece[1]))
        else:
            pieces = [(p, 0, p.numel()) for p in (self.owners.owned if self.owners is not None else self.params)]
        self.pieces: List[Tuple[torch.nn.Parameter, int, int]] = pieces
        self.masters = [_master(*piece) for piece in pieces]
        self.optimizer = torch.optim.AdamW(
            _param_groups_of_pieces(self.masters, pieces, args.weight_decay),
            lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, fused=True)
        piece_of_master = {id(m): piece for m, piece in zip(self.masters, pieces)}
        in_order = [piece_of_master[id(m)] for g in self.optimizer.param_groups for m in g["params"]]
        self.params_in_optimizer_order = [p for p, _, _ in in_order]
        self.optimizer.param_pieces = [(start, end) for _, start, end in in_order] if sharded else None
        self._piece_index = [index[id(p)] for p, _, _ in pieces]
        # On resume, `resume.check_schedule` has refused settings that differ from the checkpoint's
        # unless a side was chosen (Megatron-LM's --override-opt_param-scheduler: this run's values;
        # otherwise the checkpoint's, which then equal them or were asked for).
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr,
            min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters,
            lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
            wd_incr_steps=args.train_iters, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=not getattr(args, "override_opt_param_scheduler", False),
            override_opt_param_scheduler=getattr(args, "override_opt_param_scheduler", False))

    @property
    def _sliced(self) -> bool:
        """Pieces of megatron DDP's shards (reduce-scattered gradients)."""
        return self.megatron_ddp and self.args.use_distributed_optimizer

    def zero_grad(self) -> None:
        if self.megatron_ddp:
            self.model.zero_grad_buffer()
        for p in self.params + self.masters:
            p.grad = None
        for p in self._float32_accumulated:
            p.main_grad.zero_()

    def _reduced_gradients(self) -> List[torch.Tensor]:
        """The float32 gradient of each of `params`, reduced over data parallel (and scaled by 1 / DP);
        after a reduce-scatter only this rank's pieces of it are reduced."""
        if self.megatron_ddp:
            from megatron.core.distributed import finalize_model_grads

            finalize_model_grads([self.model])
            return [p.main_grad for p in self.params]  # float32, reduced and scaled by megatron's DDP
        grads = [p.main_grad if p.dtype != torch.float32  # (float32 accumulation of a bf16 parameter's)
                 else torch.zeros_like(p) if p.grad is None else p.grad  # a float32 .grad is used in place
                 for p in self.params]
        reduce_gradients(self.params, grads, sequence_parallel=self.args.sequence_parallel)
        return grads

    def gradient_norm(self) -> float:
        """Reduce the gradients and return the global gradient norm (every rank the same value);
        nothing is updated until `update`."""
        grads = self._reduced_gradients()
        self._piece_grads = [piece_of(grads[i], (start, end))
                             for i, (_, start, end) in zip(self._piece_index, self.pieces)]
        if self._sliced:
            return global_grad_norm([p for p, _, _ in self.pieces], self._piece_grads, sharded=True)
        return global_grad_norm(self.params, grads)

    def update(self, grad_norm: float) -> None:
        """Clip to --clip-grad, AdamW on this rank's masters, copy them back, and (sharded) gather or
        broadcast the updated parameters."""
        for master, grad in zip(self.masters, self._piece_grads):
            master.grad = grad
        self._piece_grads = None
        clip = self.args.clip_grad
        if clip > 0 and grad_norm > clip:
            for master in self.masters:
                master.grad.mul_(clip / (grad_norm + 1e-6))
        self.optimizer.step()
        with torch.no_grad():
            for master, (p, start, end) in zip(self.masters, self.pieces):
                if p.dtype != torch.float32:  # (float32 masters are the parameter's own elements)
                    piece_of(p.detach(), (start, end)).copy_(master)
        if self._sliced:
            self.model.start_param_sync(force_sync=True)  # all-gather the shards: every replica updated
        elif self.owners is not None:
            self.owners.broadcast()

    def step(self) -> float:
        """`gradient_norm` then `update`; returns the gradient norm."""
        grad_norm = self.gradient_norm()
        self.update(grad_norm)
        return grad_norm
