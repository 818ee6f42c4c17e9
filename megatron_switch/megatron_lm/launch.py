"""Run a Megatron-LM pretraining script with the Switch flags and specs.

`run("pretrain_gpt.py", argv)` locates Megatron-LM (`--megatron-path DIR`, removed from argv before
Megatron-LM parses, or the first PYTHONPATH / sys.path entry holding the script), checks the
Switch flags against Megatron-LM's own parser before anything starts, and executes the script as
`__main__` with `megatron.training.pretrain` wrapped: our flags are added through
`extra_args_provider` (after the script's own provider; no Megatron-LM flag is redefined) and,
with --moe-switch, the model provider selects the Switch spec (providers.py; GPT: `--spec
megatron_switch.spec get_switch_gpt_layer_spec`; T5: `t5_model_provider`). Without --moe-switch
the script runs unchanged.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from megatron_switch.config import SwitchConfigError


class MegatronLMNotFound(RuntimeError):
    """Megatron-LM's repository could not be located; the message says how to point at it."""


def split_megatron_path(argv: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """(--megatron-path value or None, argv without it); accepts `--megatron-path DIR` and `=DIR`."""
    rest, path, args = [], None, list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--megatron-path":
            if not args:
                raise MegatronLMNotFound("--megatron-path needs a directory (a Megatron-LM checkout)")
            path = args.pop(0)
        elif arg.startswith("--megatron-path="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return path, rest


def find_megatron_lm(script: str, path: Optional[str] = None) -> str:
    """The Megatron-LM root holding `script` and megatron/training: `path`, else the first
    sys.path entry (PYTHONPATH comes first) that has both."""
    candidates = [path] if path else [p for p in sys.path if p]
    for root in candidates:
        root = os.path.abspath(root)
        if os.path.isfile(os.path.join(root, script)) and \
                os.path.isdir(os.path.join(root, "megatron", "training")):
            return root
    where = f"--megatron-path {path}" if path else "PYTHONPATH"
    raise MegatronLMNotFound(
        f"no Megatron-LM checkout with {script} and megatron/training found via {where}: clone "
        "https://github.com/NVIDIA/Megatron-LM (tag core_v0.16.1 matches megatron-core 0.16.1) and "
        "pass --megatron-path /path/to/Megatron-LM or put it on PYTHONPATH")


def preflight(argv: Sequence[str]) -> None:
    """Parse argv with Megatron-LM's parser plus ours and build the SwitchConfig (with
    --moe-switch), so a bad Switch flag fails before Megatron-LM initialises anything."""
    from megatron_switch.megatron_lm.arguments import megatron_parser, switch_config

    parser = megatron_parser()
    args, _ = parser.parse_known_args(list(argv))
    if args.moe_switch:
        from megatron_switch.arguments import typed_dests

        switch_config(args, typed_dests(parser, argv))


def _with_switch_args(extra_args_provider: Optional[Callable]) -> Callable:
    from megatron_switch.arguments import add_switch_args

    def provider(parser):
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        return add_switch_args(parser)

    return provider


def run(script: str, argv: Optional[Sequence[str]] = None) -> None:
    """Execute Megatron-LM's `script` (pretrain_gpt.py or pretrain_t5.py) with Switch support."""
    path, argv = split_megatron_path(sys.argv[1:] if argv is None else argv)
    root = find_megatron_lm(script, path)
    if root not in sys.path:
        sys.path.insert(0, root)
    preflight(argv)
    import megatron.training

    from megatron_switch.megatron_lm.providers import PROVIDERS

    original = megatron.training.pretrain
    wrap_model_provider = PROVIDERS[script]

    @functools.wraps(original)
    def pretrain(datasets_provider, model_provider, model_type, forward_step, *args,
                 extra_args_provider=None, **kwargs):
        return original(datasets_provider, wrap_model_provider(model_provider), model_type, forward_step,
                        *args, extra_args_provider=_with_switch_args(extra_args_provider), **kwargs)

    megatron.training.pretrain = pretrain
    sys.argv = [os.path.join(root, script), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        megatron.training.pretrain = original


def main(script: str) -> None:
    """Command-line entry: errors a user can fix end the process with their message (exit 2)."""
    try:
        run(script)
    except (MegatronLMNotFound, SwitchConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
