"""Switch T5 as the released Switch Transformer checkpoints compute it, on megatron-core's `T5Model`.

`build_switch_t5(settings)` builds a `SwitchT5Model` from one frozen `T5Settings`. What T5 (T5X, and
Hugging Face's `SwitchTransformersForConditionalGeneration`) computes, and where it comes from here:

- relative position bias: T5Model's own `RelativePositionEmbedding` (`position_embedding_type=
  'relative'`): bucketed, one table per stack shared by the stack's layers, bidirectional in the
  encoder, causal in the decoder, none in cross-attention. Megatron-LM asserts Transformer Engine
  for it; here the attention cores are `SDPAttention` (specs/gpt.py), which adds the bias to the scores
  on CPU and GPU alike;
- unscaled dot-product attention: `softmax_scale=1.0` (no 1/sqrt(d_kv));
- `T5LayerNorm` for every norm (RMS, no mean, no bias, variance in float32, eps 1e-6);
- no biases anywhere (`add_bias_linear=False`; the experts must be built with `expert_bias=False`);
- FFNs: ReLU, or gated GELU with the tanh approximation ("gated-gelu": T5X's `gelu` is
  `jax.nn.gelu(approximate=True)`, Hugging Face's T5 v1.1 `gelu_new`), in dense and expert layers;
- tied embeddings: `TiedT5LMHead` scales the decoder output by d_model ** -0.5 before the shared
  embedding and has no vocabulary bias (megatron's `T5LMHead` has one when tied); untied: megatron's
  own head (no bias, no rescale), as T5 computes it.
Switch layers sit at layers k, 2k, ... (1-based) of each stack, k per stack (`encoder_expert_interval`,
`decoder_expert_interval`; 0: no Switch layer in that stack). Dropout follows megatron (attention
probabilities, and after each sublayer); T5 also drops inside the FFN and after the final norm.

The model is one pipeline stage (megatron-core's T5 has no pipeline split of a stack); tensor,
sequence and expert parallelism come from the configs and megatron's process groups as for GPT.
Attention masks follow megatron's convention (True: may not attend), any shape that broadcasts to
[b, heads, s_q, s_k]; `data.span_corruption.t5_attention_masks` builds T5's.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.models.T5.t5_model import T5LMHead, T5Model
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_switch.config import SwitchConfig
from megatron_switch.layer import SwitchMLP
from megatron_switch.experts.base import CHECKPOINT_KEYS
from megatron_switch.specs.t5 import get_switch_t5_layer_specs

STACKS = ("encoder", "decoder")

# T5's FFN names (Hugging Face's `feed_forward_proj`) -> the experts' SwitchConfig.activation.
FFN_ACTIVATIONS = {"relu": "relu", "gated-gelu": "geglu_tanh"}

# Added to the Switch init seed for the decoder's Switch layers: layer numbers restart at 1 in each
# stack, and encoder layer k must not start with the same router and experts as decoder layer k.
DECODER_INIT_SEED_OFFSET = 1_000_003


class T5ConfigError(ValueError):
    """A T5 setting that cannot build the model; the message says what to change."""


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (T5X's and Hugging Face's `gelu_new`)."""
    return F.gelu(x, approximate="tanh")


@dataclasses.dataclass(frozen=True)
class T5Settings:
    """The architecture of a Switch T5 (defaults: Switch-Base's dense shape).

    vocab_size: rows of the shared embedding and the output layer (Megatron's padded vocabulary).
    d_model, num_heads, d_kv (megatron's kv_channels; num_heads * d_kv need not be d_model), d_ff.
    encoder_layers, decoder_layers: layers per stack.
    relative_attention_num_buckets, relative_attention_max_distance: T5's relative position buckets.
    activation: "relu" or "gated-gelu" (dense and expert FFNs).
    tie_word_embeddings: the output layer is the shared input embedding (T5's d_model ** -0.5 rescale).
    dropout: megatron's hidden and attention dropout (T5's dropout_rate).
    layer_norm_epsilon: of every T5LayerNorm.
    switch: the Switch layers' settings (its activation must be FFN_ACTIVATIONS[activation], its
        experts without bias); None: a dense T5.
    encoder_expert_interval, decoder_expert_interval: Switch layers at k, 2k, ... of that stack;
        None takes switch.expert_interval, 0 means none in that stack.
    """

    vocab_size: int
    d_model: int = 768
    num_heads: int = 12
    d_kv: int = 64
    d_ff: int = 3072
    encoder_layers: int = 12
    decoder_layers: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    activation: str = "relu"
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-6
    switch: Optional[SwitchConfig] = None
    encoder_expert_interval: Optional[int] = None
    decoder_expert_interval: Optional[int] = None

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise T5ConfigError(message)

        for name in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "encoder_layers", "decoder_layers"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"T5 {name} must be a positive integer, got {value!r}")
        buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
        need(buckets >= 4, f"relative_attention_num_buckets must be >= 4 (T5 uses 32), got {buckets}")
        need(distance > buckets // 2,
             f"relative_attention_max_distance must exceed half the buckets ({buckets // 2}): the buckets past "
             f"the exact ones are logarithmic up to it (T5 uses 128 with 32 buckets), got {distance}")
        need(self.activation in FFN_ACTIVATIONS,
             f"T5 activation must be one of {', '.join(FFN_ACTIVATIONS)}, got {self.activation!r}")
        need(0 <= self.dropout < 1, f"T5 dropout must be in [0, 1), got {self.dropout}")
        need(self.layer_norm_epsilon > 0, f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        for name in ("encoder_expert_interval", "decoder_expert_interval"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 0),
                 f"{name} must be >= 0 (0: no Switch layer in that stack), got {value!r}")
        if self.switch is not None:
            expert_activation = FFN_ACTIVATIONS[self.activation]
            need(self.switch.activation == expert_activation,
                 f"a T5 with {self.activation} FFNs needs experts with the same activation: build the "
                 f"SwitchConfig with activation={expert_activation!r} (--switch-expert-activation "
                 f"{expert_activation}), got {self.switch.activation!r}")
            need(not self.switch.expert_bias,
                 "T5 has no biases: build the SwitchConfig with expert_bias=False (--switch-no-expert-bias)")

    def expert_interval(self, stack: str) -> int:
        """k of the stack's Switch layers k, 2k, ...; 0 when it has none."""
        given = getattr(self, f"{stack}_expert_interval")
        if self.switch is None:
            return 0
        return self.switch.expert_interval if given is None else given

    def num_layers(self, stack: str) -> int:
        return getattr(self, f"{stack}_layers")

    def switch_layer_numbers(self, stack: str) -> list:
        """The stack's Switch layers, 1-based."""
        k = self.expert_interval(stack)
        return list(range(k, self.num_layers(stack) + 1, k)) if k else []

    def stack_switch_config(self, stack: str) -> Optional[SwitchConfig]:
        """The SwitchConfig that places this stack's Switch layers; None when it has none."""
        k = self.expert_interval(stack)
        if k == 0:
            return None
        seed = self.switch.init_seed + (DECODER_INIT_SEED_OFFSET if stack == "decoder" else 0)
        return dataclasses.replace(self.switch, expert_interval=k, init_seed=seed)


# TransformerConfig fields that T5Settings decide; `t5_transformer_configs` refuses them as overrides.
ARCHITECTURE_FIELDS = frozenset({
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels", "num_query_groups",
    "add_bias_linear", "add_qkv_bias", "normalization", "layernorm_epsilon", "softmax_scale",
    "activation_func", "gated_linear_unit", "hidden_dropout", "attention_dropout"})


def t5_transformer_configs(settings: T5Settings, **overrides) -> Tuple[TransformerConfig, TransformerConfig]:
    """(encoder, decoder) megatron TransformerConfigs for `settings`.

    overrides: any other TransformerConfig field (parallel sizes, precision, init methods,
    recomputation, ...); use_cpu_initialization defaults to True (the model is built on the CPU,
    then moved). Architecture fields come from the settings only (T5ConfigError otherwise).
    """
    clash = sorted(ARCHITECTURE_FIELDS & overrides.keys())
    if clash:
        raise T5ConfigError(f"{', '.join(clash)}: set by T5Settings (the T5 architecture), not by an override")
    gated = settings.activation == "gated-gelu"
    kwargs = dict(
        hidden_size=settings.d_model, ffn_hidden_size=settings.d_ff, num_attention_heads=settings.num_heads,
        kv_channels=settings.d_kv, add_bias_linear=False, add_qkv_bias=False, normalization="RMSNorm",
        layernorm_epsilon=settings.layer_norm_epsilon, softmax_scale=1.0,
        activation_func=gelu_tanh if gated else F.relu, gated_linear_unit=gated,
        hidden_dropout=settings.dropout, attention_dropout=settings.dropout, use_cpu_initialization=True)
    kwargs.update(overrides)
    return (TransformerConfig(num_layers=settings.encoder_layers, **kwargs),
            TransformerConfig(num_layers=settings.decoder_layers, **kwargs))


class T5LayerNorm(torch.nn.Module):
    """T5's layer norm: y = w * x / sqrt(mean(x^2) + eps); no mean subtracted, no bias.

    The variance is computed in float32; with a half-precision weight the normalised input is cast
    to it before the scale (as T5X and Hugging Face do). Under sequence parallelism each TP rank
    normalises its own shard, so the weight is marked `sequence_parallel` (its gradient is summed
    over the TP group by the gradient reduction), as megatron marks its fused norms.
    Built by megatron's TransformerLayer / TransformerBlock as `(config, hidden_size, eps)`.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.eps = eps
        if config.sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class TiedT5LMHead(T5LMHead):
    """T5's output over tied embeddings: logits = (h * d_model ** -0.5) @ E^T, no vocabulary bias.

    megatron's T5LMHead gives a tied output layer a vocabulary bias and no rescale; this one drops
    the bias and scales the decoder output first (Mesh TensorFlow's, T5X's and Hugging Face's rule).
    """

    def __init__(self, config: TransformerConfig, parallel_output: bool, vocab_size: int,
                 pre_process: bool = True, tp_group=None):
        super().__init__(config, parallel_output, vocab_size, pre_process=pre_process,
                         share_embeddings_and_output_weights=True, tp_group=tp_group)
        self.output_layer.register_parameter("bias", None)
        self.output_scale = config.hidden_size ** -0.5

    def forward(self, hidden_states: torch.Tensor, word_embeddings_weight: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states * self.output_scale, word_embeddings_weight)


class SwitchT5Model(T5Model):
    """megatron-core's T5Model, with `TiedT5LMHead` as its head when the embeddings are tied.

    Build it with `build_switch_t5`; forward is T5Model's: (encoder ids [b, s_e], decoder ids
    [b, s_d], encoder mask, decoder mask, encoder-decoder mask, lm_labels=None) -> logits
    [b, s_d, V / TP] (labels None) or the per-token loss [b, s_d]. `settings`: what it was built from.
    """

    def __init__(self, *args, settings: T5Settings, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings
        if self.post_process and self.share_embeddings_and_output_weights:
            self.lm_head = TiedT5LMHead(self.config, self.parallel_output, self.vocab_size, self.pre_process,
                                        tp_group=self.tp_group)
            self.output_layer = self.lm_head.output_layer

    def description(self) -> Dict[str, object]:
        """What a checkpoint records of the encoder-decoder beyond the shared model fields."""
        return t5_description(self.settings)


def t5_description(s: T5Settings) -> Dict[str, object]:
    """What a checkpoint records of a Switch T5 beyond the shared model fields (the trainer's flag
    names: `--model t5`, `--encoder-num-layers`, ...)."""
    return {"model": "t5", "encoder_num_layers": s.encoder_layers, "decoder_num_layers": s.decoder_layers,
            "kv_channels": s.d_kv, "feed_forward_proj": s.activation,
            "relative_attention_num_buckets": s.relative_attention_num_buckets,
            "relative_attention_max_distance": s.relative_attention_max_distance,
            "encoder_expert_interval": s.expert_interval("encoder"),
            "decoder_expert_interval": s.expert_interval("decoder")}


def _with_t5_norms(layer: ModuleSpec) -> ModuleSpec:
    """A TransformerLayer spec whose norms (those it has) are T5LayerNorm."""
    names = ("input_layernorm", "pre_cross_attn_layernorm", "pre_mlp_layernorm")
    norms = {name: T5LayerNorm for name in names if getattr(layer.submodules, name) is not IdentityOp}
    return dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, **norms))


def switch_t5_layer_specs(settings: T5Settings, encoder_config: TransformerConfig,
                          decoder_config: TransformerConfig) -> Tuple[TransformerBlockSubmodules, ...]:
    """(encoder, decoder) block specs: megatron-core's local T5 layers with `SDPAttention` cores
    (`get_switch_t5_layer_specs`), Switch layers at each stack's own k, 2k, ..., and T5LayerNorm
    for every norm, the final ones included."""
    blocks = []
    for index, stack in enumerate(STACKS):
        specs = get_switch_t5_layer_specs(encoder_config, decoder_config, settings.stack_switch_config(stack),
                                          use_transformer_engine=False)
        blocks.append(TransformerBlockSubmodules(
            layer_specs=[_with_t5_norms(spec) for spec in specs[index].layer_specs], layer_norm=T5LayerNorm))
    return tuple(blocks)


def build_switch_t5(settings: T5Settings, *, parallel_output: bool = True, pg_collection=None,
                    **config_overrides) -> SwitchT5Model:
    """The Switch T5 of `settings`, on megatron's process groups (initialise them first).

    config_overrides: TransformerConfig fields other than the architecture (see
    `t5_transformer_configs`), e.g. tensor_model_parallel_size, sequence_parallel, bf16,
    params_dtype, init_method. Weights: megatron's initialisation (Switch layers: the layout-
    independent Switch init); load others with `load_state_dict(local_state_dict(model, full))`.
    """
    encoder_config, decoder_config = t5_transformer_configs(settings, **config_overrides)
    if decoder_config.pipeline_model_parallel_size > 1:
        raise T5ConfigError("megatron-core's T5 has no pipeline split of a stack: use "
                            "--pipeline-model-parallel-size 1")
    encoder_spec, decoder_spec = switch_t5_layer_specs(settings, encoder_config, decoder_config)
    return SwitchT5Model(
        settings=settings, config=decoder_config, encoder_config=encoder_config,
        transformer_encoder_layer_spec=encoder_spec,
        transformer_decoder_layer_spec=decoder_spec, vocab_size=settings.vocab_size,
        max_sequence_length=0,  # read only by learned absolute positions; relative ones have no limit
        parallel_output=parallel_output, share_embeddings_and_output_weights=settings.tie_word_embeddings,
        position_embedding_type="relative", relative_attention_num_buckets=settings.relative_attention_num_buckets,
        relative_attention_max_distance=settings.relative_attention_max_distance, pg_collection=pg_collection)


def switch_layers_by_stack(model: T5Model) -> Dict[str, Dict[int, SwitchMLP]]:
    """{"encoder": {layer number: SwitchMLP}, "decoder": {...}}: layer numbers restart in each stack,
    so `layer.switch_stats` (keyed by layer number alone) cannot tell the stacks apart."""
    return {stack: {layer.layer_number: layer.mlp for layer in getattr(model, stack).layers
                    if isinstance(layer.mlp, SwitchMLP)}
            for stack in STACKS if getattr(model, stack, None) is not None}


def local_state_dict(model: torch.nn.Module, full_state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A one-process state dict (every expert, no tensor-parallel split) cut to what this rank of
    `model` holds: each Switch layer's expert banks ([E, ...] -> [E / EP, ...], this rank's experts).
    Tensor-parallel slicing is not done here (TP = 1; checkpoints reshard across TP)."""
    state = dict(full_state)
    for name, module in model.named_modules():
        if isinstance(module, SwitchMLP):
            first, count = module.experts.first_expert, module.experts.num_local_experts
            for key in CHECKPOINT_KEYS:
                full_key = f"{name}.experts.{key}"
                if full_key in state:
                    state[full_key] = state[full_key][first:first + count]
    return state
