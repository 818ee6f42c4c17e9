"""`megatron-switch convert`: any checkpoint format and layout to any other, offline, on CPU.

Formats: `torch_dist` (megatron dist_checkpointing, what the trainer saves), `torch` (Megatron-LM's
legacy per-rank files) and `safetensors` (one consolidated file plus a JSON index).
Every conversion goes through `checkpoint.pipeline` (manifest, temporary directory, verification,
atomic rename; one block of one tensor in memory at a time). Hugging Face folders: `--from-hf`,
`--to-hf` (`checkpoint.huggingface_convert`); dense to Switch: `--upcycle` (`checkpoint.upcycle`).
Every pickle of the source is read through `safe_pickle`'s allow-list unless `--trust-checkpoint-code`.
"""

from __future__ import annotations

import argparse
import sys

from megatron_switch.arguments import CommandParser
from megatron_switch.checkpoint.contents import ConvertError
from megatron_switch.checkpoint.layout import CheckpointError
from megatron_switch.checkpoint.pipeline import (
    FORMATS,
    check_new_directory,
    check_target_flags,
    open_checkpoint,
    write_converted,
)
from megatron_switch.checkpoint.upcycle import Upcycle, add_upcycle_args, upcycle_from_args
from megatron_switch.parallel import LayoutError

__all__ = ["FORMATS", "convert", "main", "open_checkpoint"]
DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's former save_pretrained default, "5GB"


def convert(load: str, save: str, target_tp: int | None = None, target_pp: int | None = None,
            target_ep: int | None = None, fmt: str | None = None, no_optim: bool = False,
            progress: bool = True, log=print, trust_checkpoint_code: bool = False,
            upcycle: Upcycle | None = None) -> dict:
    """Convert the checkpoint at `load` into a new checkpoint directory `save`.

    Target layout defaults to the source's, format to the source's. Returns the written manifest.
    Raises ConvertError / LayoutError (nothing is written then) with the fix in the message; a
    pickle naming a global off `safe_pickle`'s allow-list raises CheckpointCodeError (a ConvertError)
    unless `trust_checkpoint_code`. `upcycle`: read the dense checkpoint at `load` as the Switch
    checkpoint it describes (checkpoint.upcycle) and write that.
    """
    save = check_new_directory(save, "--save")
    check_target_flags(target_tp, target_pp, target_ep, fmt)
    if upcycle is not None:
        upcycle.check_recorded(load)
    reader = open_checkpoint(load, trusted=trust_checkpoint_code)
    try:
        if upcycle is not None:
            reader = upcycle.wrap(reader, log)
        manifest = write_converted(reader, save, target_tp, target_pp, target_ep, fmt, no_optim, progress, log)
    finally:
        reader.close()
    if upcycle is not None:
        log(reader.resume_hint(save))
    return manifest


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' (Hugging Face's decimal units), '512MiB', '1000000' -> bytes."""
    number = text.strip().upper().rstrip("BIKMGT ")
    unit = text.strip().upper()[len(number):].strip()
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 5GB, 500MB or 512MiB") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a shard size must be positive")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="megatron-switch convert",
        description="Convert a checkpoint between layouts (TP/PP/EP) and formats, offline on CPU, one tensor "
                    "in memory at a time; import a Hugging Face Switch Transformers folder (--from-hf) or export "
                    "a Switch T5 checkpoint as one (--to-hf). The output is written to a temporary sibling "
                    "directory, verified against a manifest of the source (shape, dtype, SHA-256 of every tensor) "
                    "and only then renamed into place. An existing target is refused, never overwritten: remove "
                    "it first to replace it.")
    p.add_argument("--load", default=None, help="Checkpoint root (with latest_checkpointed_iteration.txt), an "
                   "iter_XXXXXXX directory, or a safetensors directory.")
    p.add_argument("--save", default=None, help="New checkpoint directory to create (must not exist).")
    p.add_argument("--from-hf", default=None, metavar="DIR",
                   help="A Hugging Face Switch Transformers folder (config.json and model.safetensors, its shards "
                        "and index, or pytorch_model*.bin) to import as a --model t5 checkpoint at --save; the "
                        "train flags that load it are written beside it.")
    p.add_argument("--to-hf", default=None, metavar="DIR",
                   help="New folder to export the Switch T5 checkpoint --load to, as Hugging Face's "
                        "SwitchTransformersForConditionalGeneration.from_pretrained reads it.")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES, metavar="SIZE",
                   help="--to-hf: largest safetensors shard (default 5GB).")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="--from-hf: pad the vocabulary as the trainer will with this flag (default 128, as Megatron).")
    p.add_argument("--target-tp", type=int, default=None, help="Tensor-parallel size (default: the source's).")
    p.add_argument("--target-pp", type=int, default=None, help="Pipeline-parallel size (default: the source's).")
    p.add_argument("--target-ep", type=int, default=None, help="Expert-parallel size (default: the source's).")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="torch: Megatron-LM's legacy mp_rank_* files; torch_dist: dist_checkpointing; "
                        "safetensors: one consolidated file + JSON index (default: the source's format; "
                        "torch_dist for --from-hf).")
    p.add_argument("--no-optim", action="store_true",
                   help="Drop the optimizer state (Adam moments, float32 master weights). Every format "
                        "holds it otherwise.")
    p.add_argument("--trust-checkpoint-code", action="store_true",
                   help="Unpickle the source's Python objects without the allow-list (the globals megatron-switch "
                        "and Megatron-LM checkpoints hold): a crafted checkpoint then runs code. Only for a "
                        "checkpoint whose source you trust.")
    p.add_argument("--no-progress-bar", action="store_true")
    add_upcycle_args(p)
    return p


def _check_flag_combination(args, parser: argparse.ArgumentParser) -> None:
    """Which flags each kind of conversion takes: parser.error names the one that does not fit."""
    layout_flags = [f for f, v in (("--target-tp", args.target_tp), ("--target-pp", args.target_pp),
                                   ("--target-ep", args.target_ep), ("--format", args.format),
                                   ("--no-optim", args.no_optim)) if v]
    if args.from_hf and args.to_hf:
        parser.error("--from-hf imports and --to-hf exports: give one of them")
    if args.from_hf:
        if args.load or not args.save:
            parser.error("--from-hf DIR takes --save CKPT (the new checkpoint), not --load")
    elif args.to_hf:
        if not args.load:
            parser.error("--to-hf DIR needs --load CKPT, the Switch T5 checkpoint to export")
        extra = [*(["--save"] if args.save else []), *layout_flags]
        if extra:
            parser.error(f"--to-hf DIR takes --load CKPT only (a Hugging Face folder has no layout): drop "
                         f"{', '.join(extra)}")
    elif not args.load or not args.save:
        parser.error("give --load CKPT and --save NEW (or --from-hf DIR --save NEW, or --load CKPT --to-hf DIR)")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_flag_combination(args, parser)
    from megatron_switch.compat.startup import import_megatron_core

    import_megatron_core()  # before the converters below import it (compat/startup.py says why)
    from megatron_switch.checkpoint.huggingface_convert import export_huggingface, import_huggingface

    progress, trusted = not args.no_progress_bar, args.trust_checkpoint_code
    try:
        upcycle = upcycle_from_args(args)
        if upcycle is not None and (args.from_hf or args.to_hf):
            raise ConvertError("--upcycle reads a dense checkpoint of ours (--load): it does not combine with "
                               "--from-hf or --to-hf; import or export first, then upcycle")
        if args.from_hf:
            import_huggingface(args.from_hf, args.save, args.target_tp, args.target_pp, args.target_ep, args.format,
                               args.make_vocab_size_divisible_by, progress=progress, trust_checkpoint_code=trusted)
        elif args.to_hf:
            export_huggingface(args.load, args.to_hf, args.max_shard_size, progress=progress,
                               trust_checkpoint_code=trusted)
        else:
            convert(args.load, args.save, args.target_tp, args.target_pp, args.target_ep, args.format, args.no_optim,
                    progress=progress, trust_checkpoint_code=trusted, upcycle=upcycle)
    except (ConvertError, CheckpointError, LayoutError) as err:
        print(f"megatron-switch convert: error: {err}", file=sys.stderr)
        sys.exit(1)
