"""Memory per GPU of a Switch model under a (TP, PP, EP, DP) layout: weights, gradients, optimizer
state and activations of the most loaded rank.

Bytes per parameter (Megatron's mixed precision, as in Megatron-LM's theoretical memory report):
  bf16: weights 2 (routers stay float32: 4), float32 gradients 4, Adam 12 (float32 master, m, v;
        8 for the float32 routers, which are their own master);
  fp32: weights 4, gradients 4, Adam 8 (m, v).
The distributed optimizer shards the optimizer state: dense parameters over DP, experts over
expert-DP (= world / (EP x PP)); without it every rank keeps the state of what it holds.

Activations per transformer layer and micro-batch (Korthikanti et al. 2022 with flash attention, so
no s^2 term; a = bytes per activation element, s b tokens, h hidden, nd attention width, f1/f the
FFN's inner widths, cf the capacity factor):
  attention and norms  s b (a (3h + 4nd) + h)          (norm inputs, QKV input, Q K V, proj input, mask)
  dense MLP            s b (a (h + f1 + f) + h)
  Switch MLP           s b (4h + a cf (2h + f1 + f) + h)  (float32 router input; expert buffers hold
                                                         cf x the tokens: input, FFN, output; mask)
Decoder layers of encoder-decoder models add cross-attention: s_dec b (a (2h + 2nd) + h) + a 2nd s_enc b.
Sequence parallelism (assumed with TP > 1 on GPUs) divides all of it by TP; without it only the
attention and FFN interiors shrink. With full recomputation a layer keeps only its input (a s b h),
plus one layer's activations while it is recomputed. The first pipeline stage holds
min(PP, micro-batches per step) micro-batches in flight (1F1B); the last holds the float32 logits
4 s b V_p / TP.
"""

from __future__ import annotations

import dataclasses

from megatron_switch.planning.model import ModelSpec, rank_parameters

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """What the memory model needs besides the model and the layout."""

    micro_batch_size: int = 1
    global_batch_size: int = 1
    precision: str = "bf16"           # "bf16" or "fp32"
    distributed_optimizer: bool = True
    recompute: bool = False           # full activation recomputation
    sequence_parallel: bool = True    # with TP > 1


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded rank; `optimizer` is the one in force (distributed or not)."""

    weights: float
    gradients: float
    optimizer: float
    optimizer_replicated: float
    optimizer_distributed: float
    activations: float
    pipeline_stage: int
    parameters: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict[str, float]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "optimizer_without_distributed_optimizer": self.optimizer_replicated,
                "optimizer_with_distributed_optimizer": self.optimizer_distributed,
                "activations": self.activations, "total": self.total,
                "pipeline_stage": self.pipeline_stage, "parameters": self.parameters}


def _layer_activations(spec: ModelSpec, tokens: int, a: int, tp: int, sp: bool, switch: bool,
                       decoder: bool) -> float:
    """Bytes one layer keeps for backward for `tokens` (s b) tokens of its stack."""
    h, nd = spec.hidden_size, spec.attention_width
    inner = 1 / tp
    outer = inner if sp else 1.0
    attention = tokens * (a * 3 * h * outer + a * 4 * nd * inner + h * outer)
    if decoder:
        attention += tokens * (a * 2 * h * outer + a * 2 * nd * inner + h * outer)
        attention += a * 2 * nd * spec.seq_length * (tokens // spec.decoder_tokens) * inner
    if switch:
        f, f1 = spec.expert_ffn, (2 if spec.expert_gated else 1) * spec.expert_ffn
        cf = spec.capacity_factor if spec.capacity_factor > 0 else 1.0  # dropless: planned as 1
        # Each TP rank routes 1/TP of the tokens (or its sequence-parallel shard).
        mlp = tokens * (4 * h + a * cf * (2 * h + f1 + f) + h) * inner
    else:
        f, f1 = spec.ffn_hidden_size, (2 if spec.dense_is_gated else 1) * spec.ffn_hidden_size
        mlp = tokens * (a * h * outer + a * (f1 + f) * inner + h * outer)
    return attention + mlp


def _stage_activations(spec: ModelSpec, setup: TrainingSetup, tp: int, pp: int, dp: int,
                       pp_rank: int) -> float:
    a = 2 if setup.precision == "bf16" else 4
    sp = setup.sequence_parallel and tp > 1
    b = setup.micro_batch_size
    micro_batches = max(1, setup.global_batch_size // (b * dp))
    in_flight = min(pp - pp_rank, micro_batches)
    layers = []  # (tokens, switch, decoder) of this stage's layers
    if spec.encoder_decoder:
        layers += [(spec.seq_length * b, spec.is_switch_layer(i), False) for i in range(1, spec.num_layers + 1)]
        layers += [(spec.decoder_tokens * b, spec.is_switch_layer(i), True)
                   for i in range(1, spec.decoder_layers + 1)]
    else:
        per_stage = spec.num_layers // pp
        layers += [(spec.seq_length * b, spec.is_switch_layer(i), False)
                   for i in range(pp_rank * per_stage + 1, (pp_rank + 1) * per_stage + 1)]
    full = [_layer_activations(spec, t, a, tp, sp, sw, dec) for t, sw, dec in layers]
    if setup.recompute:
        kept = sum(a * t * spec.hidden_size / (tp if sp else 1) for t, _, _ in layers) + max(full)
    else:
        kept = sum(full)
    activations = kept * in_flight
    if pp_rank == pp - 1:
        out_tokens = (spec.decoder_tokens if spec.encoder_decoder else spec.seq_length) * b
        activations += 4 * out_tokens * spec.padded_vocab(tp) / tp
    return activations


def estimate_memory(spec: ModelSpec, setup: TrainingSetup, tp: int, pp: int, ep: int, dp: int) -> MemoryEstimate:
    """Memory of the most loaded rank (the pipeline stage with the largest total)."""
    world = tp * pp * dp
    expert_dp = world // (ep * pp)
    bf16 = setup.precision == "bf16"
    best = None
    for pp_rank in range(pp):
        held = rank_parameters(spec, tp, pp, ep, pp_rank)
        non_router = held.total - held.routers
        weights = (2 if bf16 else 4) * non_router + 4 * held.routers
        gradients = 4 * held.total
        adam = 12 if bf16 else 8
        dense_state = adam * (held.dense - held.routers) + 8 * held.routers
        expert_state = adam * held.experts
        replicated = dense_state + expert_state
        distributed = dense_state / dp + expert_state / expert_dp
        estimate = MemoryEstimate(
            weights=weights, gradients=gradients,
            optimizer=distributed if setup.distributed_optimizer else replicated,
            optimizer_replicated=replicated, optimizer_distributed=distributed,
            activations=_stage_activations(spec, setup, tp, pp, dp, pp_rank),
            pipeline_stage=pp_rank, parameters=held.total)
        if best is None or estimate.total > best.total:
            best = estimate
    return best
