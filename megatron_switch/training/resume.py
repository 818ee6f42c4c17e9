"""Resuming a run: what a checkpoint's learning-rate schedule and a run's flags must agree on.

Megatron-LM's rule: a setting of the schedule that differs between the checkpoint and the flags is
an error, unless the run says which side wins: `--override-opt_param-scheduler` (the flags, from the
checkpoint's iteration on) or `--use-checkpoint-opt_param-scheduler` (the checkpoint's). Without the
rule, resuming a finished run with a larger --train-iters would silently continue at --min-lr (the
decay length is the checkpoint's) and a new --lr would be ignored. Pure functions, no torch: the
launcher checks a checkpoint's recorded schedule before any process starts, the ranks check the
scheduler state they load.
"""

from __future__ import annotations

from typing import Any

# Megatron's OptimizerParamScheduler state key -> (our flag, the args attribute)
SCHEDULE_FLAGS = {"max_lr": ("--lr", "lr"), "min_lr": ("--min-lr", "min_lr"),
                  "lr_warmup_steps": ("--lr-warmup-iters", "lr_warmup_iters"),
                  "lr_decay_steps": ("--lr-decay-iters", "lr_decay_iters"),
                  "lr_decay_style": ("--lr-decay-style", "lr_decay_style"),
                  "start_wd": ("--weight-decay", "weight_decay")}


def schedule_of_args(args) -> dict[str, Any]:
    """A run's schedule in the scheduler's own keys (what `OptimizerParamScheduler.state_dict` holds)."""
    return {key: getattr(args, attr) for key, (_, attr) in SCHEDULE_FLAGS.items()}


def schedule_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'--lr-decay-iters is 10 in the checkpoint, 20 here' for each differing setting both record."""
    differences = []
    for key, (flag, _) in SCHEDULE_FLAGS.items():
        if key in saved and key in current and saved[key] != current[key]:
            note = " (it defaults to --train-iters)" if key == "lr_decay_steps" else ""
            differences.append(f"{flag} is {saved[key]} in the checkpoint, {current[key]} here{note}")
    return differences


def schedule_conflict(saved: dict[str, Any], args) -> str | None:
    """The error for a resumed run whose schedule differs from the checkpoint's and that chose no side;
    None when they agree or a side was chosen."""
    if getattr(args, "override_opt_param_scheduler", False) or getattr(args, "use_checkpoint_opt_param_scheduler",
                                                                          False):
        return None
    differences = schedule_differences(saved, schedule_of_args(args))
    if not differences:
        return None
    return (f"the learning-rate schedule differs from the checkpoint's: {'; '.join(differences)}. Pass "
            f"--override-opt_param-scheduler to follow this run's flags from the checkpoint's iteration on, or "
            f"--use-checkpoint-opt_param-scheduler to keep the checkpoint's schedule (a schedule that has run "
            f"its --lr-decay-iters stays at its --min-lr)")
