"""Switch settings from Megatron-LM's parsed arguments, and Megatron-LM's args made to describe them.

Megatron-LM's parser gives its MoE flags defaults of its own (--moe-aux-loss-coeff 0.0,
--moe-token-drop-policy probs, --moe-router-topk 2). Only the flags the user typed count here
(`typed_dests` over the command line), so the Switch defaults apply otherwise. Megatron-LM flags
that ask for something a Switch layer is not (top-2 routing, shared experts, sigmoid scores, ...)
are refused with the fix. `prepare_args` then writes the resolved settings back into Megatron-LM's
args (top-1, the explicit MoE layer pattern, loss coefficients), so that its FLOP count and MoE
log describe the Switch model.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable, FrozenSet, List, Optional, Sequence, Tuple

from megatron_switch.arguments import add_switch_args, typed_dests
from megatron_switch.config import SwitchConfig, SwitchConfigError, switch_layer_pattern
from megatron_switch.megatron_lm.stats import SWITCH_TRACK_NAMES

SPEC = ["megatron_switch.spec", "get_switch_gpt_layer_spec"]


def _is(value, *allowed) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(v in allowed for v in values)


# (dest, accepted(value), message): Megatron-LM MoE flags a Switch layer cannot honour when typed.
_REFUSED: List[Tuple[str, Callable[[object], bool], str]] = [
    ("moe_router_topk", lambda v: v == 1,
     "a Switch layer routes each token to one expert: drop --moe-router-topk or set it to 1"),
    ("moe_router_score_function", lambda v: v == "softmax",
     "a Switch router scores with a softmax: drop --moe-router-score-function"),
    ("moe_router_load_balancing_type", lambda v: _is(v, "aux_loss", "none"),
     "a Switch layer balances with the Switch aux loss (--moe-aux-loss-coeff, 0 for none): "
     "use --moe-router-load-balancing-type aux_loss or none"),
    ("moe_shared_expert_intermediate_size", lambda v: v is None,
     "a Switch layer has no shared expert: drop --moe-shared-expert-intermediate-size"),
    ("moe_router_dtype", lambda v: v in (None, "fp32"),
     "a Switch router computes in float32 (the paper's selective precision): drop --moe-router-dtype"),
    ("moe_router_enable_expert_bias", lambda v: not v,
     "aux-loss-free expert bias is not part of a Switch router: drop --moe-router-enable-expert-bias"),
    ("moe_router_num_groups", lambda v: v is None,
     "group-limited routing is not part of a Switch router: drop --moe-router-num-groups"),
    ("moe_use_upcycling", lambda v: not v,
     "--moe-use-upcycling builds Megatron's own MoE layers; it does not apply to --moe-switch"),
    ("mtp_num_layers", lambda v: v is None,
     "multi-token prediction layers are not built with Switch specs: drop --mtp-num-layers"),
]


def megatron_parser() -> argparse.ArgumentParser:
    """Megatron-LM's own argument parser (needs Megatron-LM importable) with the Switch flags added."""
    try:
        from megatron.training.arguments import add_megatron_arguments
    except ImportError as err:
        raise SwitchConfigError(
            f"Megatron-LM's megatron.training is not importable ({err}): put the Megatron-LM "
            "repository on PYTHONPATH or pass --megatron-path DIR") from err
    return add_switch_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))


def command_line_dests(argv: Optional[Sequence[str]] = None) -> FrozenSet[str]:
    """The dests the user typed on the Megatron-LM command line (default: sys.argv[1:])."""
    return typed_dests(megatron_parser(), sys.argv[1:] if argv is None else argv)


def switch_config(args: argparse.Namespace, typed: FrozenSet[str]) -> SwitchConfig:
    """The SwitchConfig of a Megatron-LM namespace; typed: the dests the user typed.

    Raises SwitchConfigError for a Megatron-LM MoE flag that a Switch layer cannot honour."""
    for dest, accepted, message in _REFUSED:
        if dest in typed and not accepted(getattr(args, dest, None)):
            raise SwitchConfigError(message)
    config = SwitchConfig.from_args(args, typed=typed)
    changes = {}
    balancing = getattr(args, "moe_router_load_balancing_type", None)
    if "moe_router_load_balancing_type" in typed and _is(balancing, "none") \
            and "moe_aux_loss_coeff" not in typed:
        changes["aux_loss_coeff"] = 0.0
    # Megatron-LM's experts follow the model's MLP flags; so do Switch experts unless told otherwise.
    if "switch_expert_activation" not in typed and getattr(args, "swiglu", False):
        changes["activation"] = "swiglu"
    if getattr(args, "add_bias_linear", True) is False:
        changes["expert_bias"] = False
    return dataclasses.replace(config, **changes) if changes else config


def use_transformer_engine(args: argparse.Namespace) -> Optional[bool]:
    """--transformer-impl local -> False; transformer_engine (Megatron-LM's default) -> None (TE
    where it is usable, local layers with SDPA attention otherwise)."""
    impl = getattr(args, "transformer_impl", "transformer_engine")
    if impl not in ("local", "transformer_engine"):
        raise SwitchConfigError(f"--transformer-impl {impl} has no Switch spec: use local or transformer_engine")
    return False if impl == "local" else None


def prepare_args(args: argparse.Namespace, typed: Optional[FrozenSet[str]] = None) -> SwitchConfig:
    """Resolve the SwitchConfig of Megatron-LM's (validated) args once and align its MoE args.

    Sets args.switch (the SwitchConfig), args.moe_router_topk = 1 (with moe_router_pre_softmax,
    the Switch router's softmax over all experts), args.moe_layer_freq to the
    explicit 0/1 pattern of the Switch layers, args.moe_aux_loss_coeff / moe_z_loss_coeff to the
    coefficients in force, args.moe_expert_capacity_factor to the one in force under
    --moe-pad-expert-input-to-capacity, and args.switch_track_names (logged with patches/ applied).
    """
    if isinstance(getattr(args, "switch", None), SwitchConfig):
        return args.switch
    switch = switch_config(args, command_line_dests() if typed is None else typed)
    args.switch = switch
    args.moe_router_topk = 1
    args.moe_router_pre_softmax = True  # Megatron's config demands it at top-1: softmax over all experts
    args.moe_layer_freq = switch_layer_pattern(switch.expert_interval, args.num_layers)
    args.moe_aux_loss_coeff = switch.aux_loss_coeff
    args.moe_z_loss_coeff = switch.z_loss_coeff or None
    if switch.pad_to_capacity:  # megatron-core's config requires a capacity factor beside the flag
        args.moe_expert_capacity_factor = switch.capacity_factor
    args.switch_track_names = list(SWITCH_TRACK_NAMES)
    return switch


def layer_settings() -> Tuple[SwitchConfig, Optional[bool], str, bool]:
    """(switch, use_transformer_engine, normalization, qk_layernorm) from Megatron-LM's global args,
    for `SwitchTransformerLayer`."""
    from megatron.training import get_args

    args = get_args()
    switch = prepare_args(args)
    use_te = use_transformer_engine(args)
    if use_te is None:
        from megatron_switch.experts import transformer_engine_available

        use_te = transformer_engine_available()
    return switch, use_te, args.normalization, bool(getattr(args, "qk_layernorm", False))
