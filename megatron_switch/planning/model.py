"""Parameter and FLOP counts of Switch models: decoder-only GPT (as megatron-core builds it) and
encoder-decoder T5 (as the paper's Mesh TensorFlow / T5X models are built).

`ModelSpec` is a model's shape. `count_parameters(spec)` gives the unique parameters (total, in
experts, active per token); `rank_parameters(spec, tp, pp, ep, pp_rank)` gives what one rank holds;
`flops_per_token(spec)` the forward matmul FLOPs.

Decoder-only GPT, exactly what `GPTModel` with `get_switch_gpt_layer_spec` builds (h hidden,
n heads, d kv channels, f FFN width, E experts, V_p vocabulary padded to a multiple of
make_vocab_size_divisible_by x TP, f1 = 2f for gated activations else f):
  embedding V_p h (TP-sharded) + position embeddings P h;
  per layer: 2 norms (2h with LayerNorm, h with RMSNorm), QKV 3ndh (+ 3nd bias), projection ndh (+ h);
  dense MLP f1 h + f h (+ f1 + h biases), or a Switch MLP: router E h (float32) and E experts of
  f1 h + f h (+ f1 + h); a final norm; an output layer V_p h when untied (with tied embeddings and
  PP > 1 the last stage holds a copy of the embedding, counted per rank, not in the total).
  TP shards QKV, projection and dense MLP weights, their column-parallel biases, and the vocabulary;
  norms, row-parallel biases, position embeddings and routers are replicated; experts are split
  over EP (expert tensor parallelism 1).

Encoder-decoder T5 (T5 v1.1 / Mesh TF conventions, checked against the released Switch configs):
no biases, RMS norms with a scale only, a shared input embedding V h (V = 32128, already padded),
an output projection V h unless tied (Switch-Base/-Large reuse the embedding; -XXL and -C do not),
one relative-position bias table (buckets x heads) per stack, shared by its layers. Encoder layer:
2 norms, self-attention 4 h n d, FFN; decoder layer: 3 norms, self- and cross-attention 2 x 4 h n d,
FFN. FFN: (2 or 3 for gated GEGLU, wi_0 wi_1 wo) x h f, in every k-th layer (k, 2k, ...) of both
stacks replaced by a router E h and E such experts.
"""

from __future__ import annotations

import dataclasses
import math

from megatron_switch.config import ACTIVATIONS, GATED_ACTIVATIONS, is_switch_layer
from megatron_switch.parallel import padded_vocab_size

ARCHITECTURES = ("gpt", "encoder-decoder")


class ModelSpecError(ValueError):
    """A model shape that cannot be built; the message says which field to change."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A Switch model's shape.

    num_layers: decoder-only: transformer layers; encoder-decoder: encoder layers.
    decoder_num_layers: encoder-decoder only: decoder layers (default num_layers).
    kv_channels: per-head width d (default hidden_size / num_attention_heads).
    activation: expert FFN activation (and the dense FFN's in encoder-decoder models).
    dense_gated: decoder-only: dense MLPs with a gated linear unit (Megatron's gated_linear_unit).
    expert_ffn_hidden_size: expert width (default ffn_hidden_size).
    add_bias: decoder-only: Megatron's add_bias_linear. expert_bias: biases in the experts.
    seq_length / decoder_seq_length: tokens per sample (encoder-decoder: encoder / decoder side).
    capacity_factor: training capacity factor (expert buffers hold cf x tokens); 0 or negative means
        dropless (planned as 1).
    """

    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    num_experts: int
    expert_interval: int = 1
    decoder_num_layers: int | None = None
    kv_channels: int | None = None
    activation: str = "relu"
    dense_gated: bool = False
    expert_ffn_hidden_size: int | None = None
    vocab_size: int = 32128
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 512
    decoder_seq_length: int | None = None
    max_position_embeddings: int | None = None
    tie_embeddings: bool = True
    normalization: str = "LayerNorm"
    add_bias: bool = True
    expert_bias: bool = True
    relative_attention_num_buckets: int = 32
    capacity_factor: float = 1.25

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ModelSpecError(message)

        need(self.architecture in ARCHITECTURES,
             f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_experts",
                     "expert_interval", "vocab_size", "seq_length", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        need(self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
             f"{self.num_attention_heads}: set kv_channels")
        need(self.activation in ACTIVATIONS,
             f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        need(self.normalization in ("LayerNorm", "RMSNorm"),
             f"normalization must be LayerNorm or RMSNorm, got {self.normalization!r}")
        need(math.isfinite(self.capacity_factor),
             f"capacity_factor must be a number (0 or negative: dropless), got {self.capacity_factor}")

    # -- derived shape -------------------------------------------------------------------------
    @property
    def encoder_decoder(self) -> bool:
        return self.architecture == "encoder-decoder"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def attention_width(self) -> int:
        """n d: the width of Q, K, V and of the projection's input."""
        return self.num_attention_heads * self.head_dim

    @property
    def expert_ffn(self) -> int:
        return self.expert_ffn_hidden_size or self.ffn_hidden_size

    @property
    def expert_gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def dense_is_gated(self) -> bool:
        return self.expert_gated if self.encoder_decoder else self.dense_gated

    @property
    def decoder_layers(self) -> int:
        return (self.decoder_num_layers or self.num_layers) if self.encoder_decoder else 0

    @property
    def total_layers(self) -> int:
        return self.num_layers + self.decoder_layers

    @property
    def decoder_tokens(self) -> int:
        return self.decoder_seq_length or self.seq_length

    @property
    def positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    def is_switch_layer(self, layer_number: int) -> bool:
        """1-based within its stack: layers k, 2k, ... (SwitchConfig.is_switch_layer)."""
        return is_switch_layer(layer_number, self.expert_interval)

    def switch_layers(self, first: int = 1, last: int | None = None) -> int:
        """Switch layers among layer numbers first..last of one stack."""
        last = self.num_layers if last is None else last
        k = self.expert_interval
        return last // k - (first - 1) // k

    @property
    def num_switch_layers(self) -> int:
        count = self.switch_layers()
        if self.encoder_decoder:
            count += self.switch_layers(1, self.decoder_layers)
        return count

    def padded_vocab(self, tp: int = 1) -> int:
        """Megatron pads to a multiple of make_vocab_size_divisible_by x TP (GPT); T5's is padded."""
        if self.encoder_decoder:
            return self.vocab_size
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp)


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Unique parameters. active: what one token passes through (one expert per Switch layer)."""

    total: int
    experts: int
    embeddings: int
    active: int

    @property
    def dense(self) -> int:
        return self.total - self.experts


@dataclasses.dataclass(frozen=True)
class RankParameters:
    """Parameters held by one rank: dense (reduced over DP), experts (over expert-DP), routers
    (float32, part of dense)."""

    dense: int
    experts: int
    routers: int

    @property
    def total(self) -> int:
        return self.dense + self.experts


# -- pieces, per rank of a TP group -------------------------------------------------------------

def _norm(spec: ModelSpec) -> int:
    if spec.encoder_decoder:
        return spec.hidden_size
    return 2 * spec.hidden_size if spec.normalization == "LayerNorm" else spec.hidden_size


def _attention(spec: ModelSpec, tp: int) -> int:
    """Self-attention: GPT's fused QKV and projection (with biases); T5's q, k, v, o."""
    h, nd = spec.hidden_size, spec.attention_width
    if spec.encoder_decoder:
        return 4 * h * nd // tp
    bias = (3 * nd // tp + h) if spec.add_bias else 0
    return 4 * h * nd // tp + bias


def _ffn(spec: ModelSpec, f: int, gated: bool, bias: bool, shards: int) -> int:
    """One FFN: fc1 [f1, h], fc2 [h, f] (+ f1 + h biases); fc1, its bias and fc2 sharded `shards` ways."""
    h, f1 = spec.hidden_size, (2 * f if gated else f)
    return (f1 * h + h * f) // shards + ((f1 // shards + h) if bias else 0)


def _dense_mlp(spec: ModelSpec, tp: int) -> int:
    return _ffn(spec, spec.ffn_hidden_size, spec.dense_is_gated, spec.add_bias and not spec.encoder_decoder, tp)


def _expert(spec: ModelSpec) -> int:
    bias = spec.expert_bias and not spec.encoder_decoder
    return _ffn(spec, spec.expert_ffn, spec.expert_gated, bias, 1)


def _router(spec: ModelSpec) -> int:
    return spec.num_experts * spec.hidden_size


def _layers(spec: ModelSpec, tp: int, first: int, last: int, cross_attention: bool) -> RankParameters:
    """Layers first..last (1-based) of one stack, as one TP rank holds them with all E experts."""
    count = last - first + 1
    switch = spec.switch_layers(first, last)
    norms = (3 if cross_attention else 2) * _norm(spec)
    attention = (2 if cross_attention else 1) * _attention(spec, tp)
    dense = count * (norms + attention) + (count - switch) * _dense_mlp(spec, tp) + switch * _router(spec)
    return RankParameters(dense, switch * spec.num_experts * _expert(spec), switch * _router(spec))


def _embeddings(spec: ModelSpec, tp: int, first_stage: bool, last_stage: bool, pp: int) -> int:
    h, vocab = spec.hidden_size, spec.padded_vocab(tp)
    if spec.encoder_decoder:
        return vocab * h // tp * (1 if spec.tie_embeddings else 2)
    count = (vocab // tp * h + spec.positions * h) if first_stage else 0
    if last_stage and (not spec.tie_embeddings or pp > 1):
        count += vocab // tp * h
    return count


def rank_parameters(spec: ModelSpec, tp: int = 1, pp: int = 1, ep: int = 1, pp_rank: int = 0) -> RankParameters:
    """What one rank of pipeline stage `pp_rank` holds under (TP, PP, EP).

    Decoder-only: stage p holds layers p L/PP + 1 .. (p + 1) L/PP, the embeddings on the first
    stage, the final norm and output layer on the last. Encoder-decoder models are planned with
    PP = 1.
    """
    if spec.encoder_decoder:
        if pp != 1:
            raise ModelSpecError("encoder-decoder models are planned with pipeline parallel size 1")
        enc = _layers(spec, tp, 1, spec.num_layers, cross_attention=False)
        dec = _layers(spec, tp, 1, spec.decoder_layers, cross_attention=True)
        extra = (2 * _norm(spec) + 2 * spec.relative_attention_num_buckets * spec.num_attention_heads
                 + _embeddings(spec, tp, True, True, 1))
        return RankParameters(enc.dense + dec.dense + extra, (enc.experts + dec.experts) // ep,
                              enc.routers + dec.routers)
    if spec.num_layers % pp:
        raise ModelSpecError(f"num_layers {spec.num_layers} is not divisible by pipeline parallel size {pp}")
    per_stage = spec.num_layers // pp
    first, last = pp_rank * per_stage + 1, (pp_rank + 1) * per_stage
    layers = _layers(spec, tp, first, last, cross_attention=False)
    is_first, is_last = pp_rank == 0, pp_rank == pp - 1
    dense = layers.dense + _embeddings(spec, tp, is_first, is_last, pp) + (_norm(spec) if is_last else 0)
    return RankParameters(dense, layers.experts // ep, layers.routers)


def count_parameters(spec: ModelSpec) -> ParameterCount:
    """Unique parameters of the whole model (TP = PP = EP = 1)."""
    whole = rank_parameters(spec)
    embeddings = _embeddings(spec, 1, True, True, 1)
    expert_one = _expert(spec)
    active = whole.total - spec.num_switch_layers * (spec.num_experts - 1) * expert_one
    return ParameterCount(total=whole.total, experts=whole.experts, embeddings=embeddings, active=active)


def flops_per_token(spec: ModelSpec) -> dict[str, float]:
    """Forward matmul FLOPs (2 per multiply-add) per token; training is about 3x (4x with full
    recomputation). Attention scores count the full sequence (no causal discount, as Megatron-LM's
    FLOPs count does); a token's Switch layer costs its router and one expert.

    Returns {"forward": mean over the tokens of a sample, "train": 3 x forward} and, for
    encoder-decoder models, "encoder_token" and "decoder_token".
    """
    h, nd, f_expert = spec.hidden_size, spec.attention_width, spec.expert_ffn
    dense_mlp = 2 * _ffn(spec, spec.ffn_hidden_size, spec.dense_is_gated, False, 1)
    switch_mlp = 2 * (_router(spec) + _ffn(spec, f_expert, spec.expert_gated, False, 1))
    logits = 2 * spec.padded_vocab() * h

    def stack(layers: int, projections: int, context: int) -> float:
        switch = spec.switch_layers(1, layers)
        return (layers * (2 * projections * h * nd + 4 * context * nd)
                + (layers - switch) * dense_mlp + switch * switch_mlp)

    if not spec.encoder_decoder:
        forward = stack(spec.num_layers, 4, spec.seq_length) + logits
        return {"forward": float(forward), "train": 3.0 * forward}
    s_enc, s_dec = spec.seq_length, spec.decoder_tokens
    # Cross-attention: K and V are projected once per encoder token, Q and O once per decoder token.
    encoder_token = stack(spec.num_layers, 4, s_enc) + spec.decoder_layers * 2 * 2 * h * nd
    decoder_token = stack(spec.decoder_layers, 6, s_dec) + spec.decoder_layers * 4 * s_enc * nd + logits
    forward = (s_enc * encoder_token + s_dec * decoder_token) / (s_enc + s_dec)
    return {"forward": float(forward), "train": 3.0 * forward,
            "encoder_token": float(encoder_token), "decoder_token": float(decoder_token)}
