"""Megatron-LM compatible flags: --moe-switch, --num-experts and the Switch knobs.

Where Megatron-LM already has a flag of the same meaning (--num-experts,
--moe-expert-capacity-factor, ...) we use its name, and `add_switch_args` adds only the flags the
parser does not have yet, so it can extend Megatron-LM's own parser (`extra_args_provider`)
without redefining anything. `typed_dests` tells which flags the user actually typed, so a
parser default (Megatron-LM's --moe-aux-loss-coeff 0.0) is not read as the user's choice.

--moe-layer-freq: an int k puts Switch layers at k, 2k, ... (1-based, the paper's placement; the
same one-in-k ratio as Megatron's int, whose first MoE layer is layer 1 instead of layer k), or a
Megatron-LM pattern list such as "([0]*3+[1])*8" (1 = MoE layer) that has this shape.
"""

from __future__ import annotations

import argparse
import ast
from typing import FrozenSet, List, Sequence, Union

from megatron_switch.config import (
    ACTIVATIONS, DROP_POLICIES, EXPERT_BACKENDS, FP8_FORMATS, FP8_RECIPES, SwitchConfig)

_D = SwitchConfig  # class attributes hold the defaults


class CommandParser(argparse.ArgumentParser):
    """The parser of every `megatron-switch` command: a refusal is the one line that says what to change and
    a pointer to --help (argparse's own error prints the whole usage first: some 80 lines for `train`)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` describes every flag)\n")


def _flags():
    """(flag, argparse kwargs) of every Switch flag, in help order."""
    return [
        ("--moe-switch", dict(action="store_true",
                              help="Replace every k-th FFN with a Switch (top-1 MoE) layer.")),
        ("--num-experts", dict(type=int, default=None, help="Experts per Switch layer.")),
        ("--moe-layer-freq", dict(type=layer_freq_type, default=None,
                                  help="Switch layer every k-th layer (k, 2k, ...; paper: 2), or a 0/1 "
                                       "pattern list of that shape, e.g. \"([0]*1+[1])*6\". Default 1.")),
        ("--expert-model-parallel-size", dict(type=int, default=1, help="Expert-parallel size.")),
        ("--moe-expert-capacity-factor", dict(type=float, default=None,
                                              help=f"Train capacity factor (default {_D.capacity_factor}; "
                                                   "0 or negative = dropless).")),
        ("--switch-eval-capacity-factor", dict(type=float, default=None,
                                               help=f"Eval capacity factor (default {_D.eval_capacity_factor}; "
                                                    "dropless when training is dropless).")),
        ("--switch-dropless", dict(action="store_true", help="No capacity limit (no dropped tokens).")),
        ("--switch-min-capacity", dict(type=int, default=None,
                                       help=f"Minimum slots per expert (default {_D.min_capacity}).")),
        ("--moe-pad-expert-input-to-capacity", dict(
            action="store_true", help="Experts compute every capacity slot, filled or not (static shapes; "
                                      "the default on GPUs; not under tensor parallelism). Elsewhere only "
                                      "the kept tokens are computed.")),
        ("--moe-token-drop-policy", dict(type=str, default=None, choices=DROP_POLICIES,
                                         help="position: first come first served; probs: highest gates.")),
        ("--moe-aux-loss-coeff", dict(type=float, default=None,
                                      help=f"Load-balancing loss alpha (default {_D.aux_loss_coeff}).")),
        ("--moe-z-loss-coeff", dict(type=float, default=None,
                                    help=f"Router z-loss beta (default {_D.z_loss_coeff}; ST-MoE: 1e-3).")),
        ("--moe-input-jitter-eps", dict(type=float, default=None,
                                        help=f"Router jitter eps (default {_D.jitter_eps}).")),
        ("--switch-init-scale", dict(type=float, default=None,
                                     help=f"Truncated-normal init scale s (default {_D.init_scale}).")),
        ("--switch-expert-dropout", dict(type=float, default=None,
                                         help="Dropout inside experts (paper fine-tuning: 0.4).")),
        ("--switch-expert-activation", dict(type=str, default=None, choices=ACTIVATIONS,
                                            help=f"Expert activation (default {_D.activation}).")),
        ("--switch-no-expert-bias", dict(action="store_true", help="Experts without biases.")),
        ("--moe-ffn-hidden-size", dict(type=int, default=None,
                                       help="Expert FFN width (default: --ffn-hidden-size).")),
        ("--switch-expert-backend", dict(type=str, default=None, choices=EXPERT_BACKENDS,
                                         help="Expert GEMM backend (default auto).")),
        ("--moe-grouped-gemm", dict(action="store_true",
                                    help="Kept tokens through torch._grouped_mm wherever its probe passes (by "
                                         "default only where it was checked: CPUs); else a GEMM per expert.")),
        ("--fp8-format", dict(type=str, default=None, choices=FP8_FORMATS,
                              help="FP8 expert GEMMs: e4m3, or hybrid (e4m3 forward, e5m2 gradients). "
                                   "Needs a GPU of compute capability 8.9+.")),
        ("--fp8-recipe", dict(type=str, default=None, choices=FP8_RECIPES,
                              help="FP8 scaling (default: tensorwise on the torch backend, delayed on te).")),
    ]


def add_switch_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the Switch flags that `parser` does not already define; returns the parser."""
    existing = set(parser._option_string_actions)
    group = parser.add_argument_group("switch", "Switch Transformer (top-1 mixture of experts)")
    for flag, kwargs in _flags():
        if flag not in existing:
            group.add_argument(flag, **kwargs)
    return parser


_PATTERN_NODES = (ast.Expression, ast.BinOp, ast.Add, ast.Mult, ast.List, ast.Tuple, ast.Constant, ast.Load)


def moe_layer_freq_expression(interval: int, num_layers: int) -> str:
    """The placement as the compact pattern expression Megatron-LM's --moe-layer-freq reads
    ("([0]*1+[1])*12"); `layer_freq_type` reads it back as `config.switch_layer_pattern`."""
    k = interval
    if k == 1:
        return "1"
    return f"([0]*{k - 1}+[1])*{num_layers // k}" + (f"+[0]*{num_layers % k}" if num_layers % k else "")


def layer_freq_type(text: Union[str, int]) -> Union[int, List[int]]:
    """--moe-layer-freq value: "k" -> k; a Python list expression of 0/1 ("([0]*3+[1])*8",
    Megatron-LM's pattern form) -> that list. Only list literals, ints, + and * are evaluated."""
    if isinstance(text, int):
        return text
    text = text.strip()
    if "[" not in text:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer k or a pattern list, got {text!r}") from None
    try:
        tree = ast.parse(text, mode="eval")
        for node in ast.walk(tree):
            if not isinstance(node, _PATTERN_NODES) or (
                    isinstance(node, ast.Constant)
                    and not (type(node.value) is int and 0 <= node.value <= 100_000)):
                raise ValueError("only list literals, integers up to 100000, + and * are allowed")
        value = eval(compile(tree, "<moe-layer-freq>", "eval"), {"__builtins__": {}}, {})
    except (SyntaxError, ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(f"cannot read the pattern {text!r}: {err}") from err
    if not isinstance(value, list) or any(x not in (0, 1) or isinstance(x, bool) for x in value):
        raise argparse.ArgumentTypeError(f"the pattern {text!r} must give a list of 0s and 1s")
    return value


_NOT_TYPED = object()


def typed_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> FrozenSet[str]:
    """The dests of the flags present in `argv` (unknown flags are ignored).

    Parses into a namespace whose every dest is already set to a marker, so argparse applies no
    default: whatever still holds the marker afterwards was not typed.
    """
    dests = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}
    namespace = argparse.Namespace(**{dest: _NOT_TYPED for dest in dests})
    parsed, _ = parser.parse_known_args(list(argv), namespace=namespace)
    return frozenset(dest for dest in dests if getattr(parsed, dest, _NOT_TYPED) is not _NOT_TYPED)
