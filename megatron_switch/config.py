"""SwitchConfig: every Switch Transformer knob, validated once.

A config is built by hand or from an argparse namespace (`SwitchConfig.from_args`) and is
immutable afterwards; every other module reads it and never looks at argparse again.
Validation raises `SwitchConfigError` with the fix in the message.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import AbstractSet, Optional

ACTIVATIONS = ("relu", "gelu", "geglu", "swiglu", "geglu_tanh")
GATED_ACTIVATIONS = ("geglu", "swiglu", "geglu_tanh")  # act(gate) * up: the first projection is twice as wide
DROP_POLICIES = ("position", "probs")
EXPERT_BACKENDS = ("auto", "torch", "te")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


def is_switch_layer(layer_number: int, interval: int) -> bool:
    """The placement rule, everywhere in the package: layer numbers are 1-based (Megatron's, counted
    within a stack), and layers k, 2k, ... are Switch layers (k = 2: Switch-Base; k = 1: Switch-C)."""
    return layer_number % interval == 0


def switch_layer_pattern(interval: int, num_layers: int) -> list[int]:
    """Megatron-LM's --moe-layer-freq list form of the placement: 1 marks a Switch layer."""
    return [int(is_switch_layer(n, interval)) for n in range(1, num_layers + 1)]


class SwitchConfigError(ValueError):
    """A Switch setting a user can fix; the message says how."""


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
    """The Switch layer's settings (paper defaults).

    num_experts: experts per Switch layer (E).
    expert_interval: every k-th transformer layer is a Switch layer (k=2 in Switch-Base, 1 in Switch-C).
    capacity_factor: train capacity factor; None, 0 or negative means dropless (megatron-core reads a
        negative factor as None).
    eval_capacity_factor: capacity factor outside training; None, 0 or negative means dropless.
    min_capacity: lower bound on the per-expert capacity C.
    pad_to_capacity: Megatron's --moe-pad-expert-input-to-capacity. True: the experts compute all
        E x C slots, filled or not (static [E_l, EP * C, h] shapes, one batched GEMM per projection,
        no host synchronisation). False: only the kept tokens (grouped GEMM; at most T rows, fewer
        when tokens are dropped). None: padded on GPUs, kept tokens only elsewhere. Padding needs
        each rank to be its own routing group: under tensor parallelism (the micro-batch's tokens
        spread over the TP ranks) the kept tokens move whatever this says.
    drop_policy: "position" (first come, first served in flattened [s, b] order) or "probs"
        (keep the highest-gate tokens).
    aux_loss_coeff: alpha of the load-balancing loss alpha * E * sum_i f_i P_i.
    z_loss_coeff: beta of the router z-loss beta * mean_t logsumexp(logits_t)^2.
    jitter_eps: multiplicative router-input jitter U(1 - eps, 1 + eps), training only.
    init_scale: s of the truncated-normal init, sigma = sqrt(s / fan_in).
    expert_dropout: dropout inside the experts, after the activation.
    activation: "relu", "gelu", "geglu", "swiglu" or "geglu_tanh" (the last three are gated; geglu_tanh
        is T5's gated GELU, with the tanh approximation).
    expert_bias: whether expert projections carry biases.
    expert_ffn_hidden_size: expert FFN width; None means the model's ffn_hidden_size.
    expert_backend: "auto", "torch" or "te".
    grouped_gemm: kept tokens through `torch._grouped_mm` (Megatron's --moe-grouped-gemm): None uses it
        where it has been checked against a GEMM per expert (CPUs), True wherever its probe passes,
        False never (a GEMM per expert).
    fp8_format: FP8 for the expert GEMMs (Megatron's --fp8-format): None, "e4m3" or "hybrid"
        (e4m3 forward, e5m2 gradients). The router and the combine never run in FP8.
    fp8_recipe: scaling recipe (Megatron's --fp8-recipe); None picks the backend's default
        (torch: tensorwise; te: delayed).
    init_seed: base seed of the layout-independent expert and router initialisation.
    """

    num_experts: int
    expert_interval: int = 1
    capacity_factor: Optional[float] = 1.25
    eval_capacity_factor: Optional[float] = 2.0
    min_capacity: int = 4
    pad_to_capacity: Optional[bool] = None
    drop_policy: str = "position"
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    jitter_eps: float = 1e-2
    init_scale: float = 0.1
    expert_dropout: float = 0.0
    activation: str = "relu"
    expert_bias: bool = True
    expert_ffn_hidden_size: Optional[int] = None
    expert_backend: str = "auto"
    grouped_gemm: Optional[bool] = None
    fp8_format: Optional[str] = None
    fp8_recipe: Optional[str] = None
    init_seed: int = 1234

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise SwitchConfigError(message)

        need(isinstance(self.num_experts, int) and self.num_experts >= 1,
             f"--num-experts must be a positive integer, got {self.num_experts!r}")
        need(self.expert_interval >= 1,
             f"--moe-layer-freq (Switch layer every k-th layer) must be >= 1, got {self.expert_interval}")
        for name, flag in (("capacity_factor", "--moe-expert-capacity-factor"),
                           ("eval_capacity_factor", "--switch-eval-capacity-factor")):
            value = getattr(self, name)
            need(value is None or math.isfinite(value),
                 f"{flag} must be a number (0 or negative means dropless), got {value}")
        need(self.min_capacity >= 0, f"--switch-min-capacity must be >= 0, got {self.min_capacity}")
        need(not self.pad_to_capacity or self.capacity_factor_for(True) is not None,
             "--moe-pad-expert-input-to-capacity pads to the capacity, and dropless training has none: "
             "give --moe-expert-capacity-factor, or drop the flag")
        need(self.drop_policy in DROP_POLICIES,
             f"--moe-token-drop-policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")
        need(self.aux_loss_coeff >= 0, f"--moe-aux-loss-coeff must be >= 0, got {self.aux_loss_coeff}")
        need(self.z_loss_coeff >= 0, f"--moe-z-loss-coeff must be >= 0, got {self.z_loss_coeff}")
        need(0 <= self.jitter_eps < 1,
             f"--moe-input-jitter-eps must be in [0, 1), got {self.jitter_eps}")
        need(self.init_scale > 0, f"--switch-init-scale must be > 0, got {self.init_scale}")
        need(0 <= self.expert_dropout < 1,
             f"--switch-expert-dropout must be in [0, 1), got {self.expert_dropout}")
        need(self.activation in ACTIVATIONS,
             f"unknown expert activation {self.activation!r}: use one of {', '.join(ACTIVATIONS)}")
        need(self.expert_ffn_hidden_size is None or self.expert_ffn_hidden_size >= 1,
             f"--moe-ffn-hidden-size (expert FFN width) must be >= 1, got {self.expert_ffn_hidden_size}")
        need(self.expert_backend in EXPERT_BACKENDS,
             f"--switch-expert-backend must be one of {EXPERT_BACKENDS}, got {self.expert_backend!r}")
        need(self.fp8_format is None or self.fp8_format in FP8_FORMATS,
             f"--fp8-format must be one of {FP8_FORMATS}, got {self.fp8_format!r}")
        need(self.fp8_recipe is None or self.fp8_recipe in FP8_RECIPES,
             f"--fp8-recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
        need(self.fp8_recipe is None or self.fp8_format is not None,
             f"--fp8-recipe {self.fp8_recipe} needs --fp8-format e4m3|hybrid")

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    def uses_grouped_gemm(self, device_type: str) -> bool:
        """Whether grouped projections on a device of this type may call torch._grouped_mm."""
        return self.grouped_gemm if self.grouped_gemm is not None else device_type == "cpu"

    def capacity_factor_for(self, training: bool) -> Optional[float]:
        """The capacity factor in force; None means dropless."""
        return _in_force(self.capacity_factor if training else self.eval_capacity_factor)

    def pads_to_capacity(self, device_type: str) -> bool:
        """Whether experts on a device of this type ("cuda", "cpu") compute every capacity slot."""
        return self.pad_to_capacity if self.pad_to_capacity is not None else device_type == "cuda"

    def capacity(self, num_tokens: int, training: bool) -> Optional[int]:
        """C = max(min_capacity, ceil(cf * T / E)); None when dropless."""
        cf = self.capacity_factor_for(training)
        if cf is None:
            return None
        return max(self.min_capacity, math.ceil(cf * num_tokens / self.num_experts))

    def is_switch_layer(self, layer_number: int) -> bool:
        """Layer numbers are 1-based, as in Megatron; layers k, 2k, ... are Switch layers."""
        return is_switch_layer(layer_number, self.expert_interval)

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  typed: Optional[AbstractSet[str]] = None) -> "SwitchConfig":
        """Build from a namespace parsed with `add_switch_args` (Megatron-LM flag names).

        typed: the argparse dests the user typed (`arguments.typed_dests`). When given, a flag the
        user did not type takes the Switch default, whatever the parser's default: Megatron-LM's
        parser defaults --moe-aux-loss-coeff to 0.0 and --moe-token-drop-policy to probs, which
        must not replace the paper's 1e-2 and position. None: every non-None value counts (our own
        parser, whose Switch flags default to None).
        --moe-layer-freq: an int k (Switch layers k, 2k, ...), or a Megatron-LM pattern list
        (1 = MoE layer) of that shape, e.g. [0, 1] * 12 or ([0]*3+[1])*8.
        """
        def given(name: str) -> bool:
            return getattr(args, name, None) is not None and (typed is None or name in typed)

        def get(name, default):
            return getattr(args, name) if given(name) else default

        if getattr(args, "num_experts", None) is None:
            raise SwitchConfigError("--moe-switch needs --num-experts N")
        interval = _interval_from_layer_freq(get("moe_layer_freq", 1), getattr(args, "num_layers", None))
        capacity_factor = get("moe_expert_capacity_factor", cls.capacity_factor)
        if getattr(args, "switch_dropless", False):
            capacity_factor = None
        # Dropless training evaluates dropless too (megatron-core has one factor for both), unless
        # --switch-eval-capacity-factor says otherwise.
        eval_default = None if _in_force(capacity_factor) is None else cls.eval_capacity_factor
        eval_capacity_factor = get("switch_eval_capacity_factor", eval_default)
        return cls(
            num_experts=args.num_experts,
            expert_interval=interval,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=get("switch_min_capacity", cls.min_capacity),
            pad_to_capacity=True if getattr(args, "moe_pad_expert_input_to_capacity", False) else None,
            drop_policy=get("moe_token_drop_policy", cls.drop_policy),
            aux_loss_coeff=_single(get("moe_aux_loss_coeff", cls.aux_loss_coeff), "--moe-aux-loss-coeff"),
            z_loss_coeff=get("moe_z_loss_coeff", cls.z_loss_coeff),
            jitter_eps=get("moe_input_jitter_eps", cls.jitter_eps),
            init_scale=get("switch_init_scale", cls.init_scale),
            expert_dropout=get("switch_expert_dropout", cls.expert_dropout),
            activation=get("switch_expert_activation", cls.activation),
            expert_bias=not getattr(args, "switch_no_expert_bias", False),
            expert_ffn_hidden_size=get("moe_ffn_hidden_size", None),
            expert_backend=get("switch_expert_backend", cls.expert_backend),
            grouped_gemm=True if getattr(args, "moe_grouped_gemm", False) and given("moe_grouped_gemm") else None,
            fp8_format=get("fp8_format", None),
            fp8_recipe=get("fp8_recipe", None) if get("fp8_format", None) else None,
            init_seed=cls.init_seed if getattr(args, "seed", None) is None else args.seed,
        )


def _in_force(capacity_factor: Optional[float]) -> Optional[float]:
    """A capacity factor as it acts: None (dropless) for None, 0 or negative."""
    return capacity_factor if capacity_factor is not None and capacity_factor > 0 else None


def _single(value, flag: str) -> float:
    """Megatron-LM's --moe-aux-loss-coeff takes a list (one value per balancing type)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise SwitchConfigError(f"{flag} takes one value for a Switch layer, got {list(value)}")
        return value[0]
    return value


def _interval_from_layer_freq(freq, num_layers: Optional[int]) -> int:
    """k of "Switch layers k, 2k, ..." from --moe-layer-freq: an int k, or a 0/1 pattern list.

    A pattern is accepted when it is k-1 dense layers and one MoE layer, repeated; anything else
    has no Switch placement and is refused with the layers it asked for.
    """
    if isinstance(freq, bool) or not isinstance(freq, (int, list, tuple)):
        raise SwitchConfigError(f"--moe-layer-freq must be an integer k (Switch layer every k-th "
                                f"layer) or a 0/1 pattern list, got {freq!r}")
    if isinstance(freq, int):
        return freq
    if not any(freq) or any(x not in (0, 1) for x in freq):
        raise SwitchConfigError(f"--moe-layer-freq pattern must hold 0s and at least one 1, got {freq!r}")
    pattern = [int(x) for x in freq]
    moe_layers = [i + 1 for i, x in enumerate(pattern) if x]
    if num_layers is not None and len(pattern) != num_layers:
        raise SwitchConfigError(f"--moe-layer-freq pattern has {len(pattern)} entries but "
                                f"--num-layers is {num_layers}: give one 0/1 per layer")
    k = moe_layers[0]
    if moe_layers != list(range(k, len(pattern) + 1, k)):
        ratio = max(1, round(len(pattern) / len(moe_layers)))
        raise SwitchConfigError(
            f"--moe-layer-freq pattern puts MoE layers at {moe_layers} (1-based), which is not a Switch "
            f"placement (layers k, 2k, ... up to the last layer); for the same one-in-{ratio} ratio use "
            f"--moe-layer-freq {ratio} (layers {list(range(ratio, len(pattern) + 1, ratio))})")
    return k
