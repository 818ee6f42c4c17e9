"""Dense GPT vs Switch GPTs of equal FLOPs per token, trained on the embedded corpus.

Every model has the same shape (layers, hidden, FFN width); the Switch models replace every second
FFN by E experts of that width (top-1: the same FLOPs per token, E times the FFN parameters).
Each runs `megatron-switch train` with 2 processes (dense: DP=2; Switch: EP=2), the same data order,
optimiser and schedule. Reported: median step time relative to dense, and the number of steps each
Switch model needs to reach the dense model's final loss (the paper's "7x" claim at toy scale).
Switch-8 also runs at capacity factor 1.0 (the paper's fastest, Table 1) beside the default 1.25.
Step time is also measured at twice the width and sequence length (WIDE, --wide-iters steps each), where
the Switch layer's small operations weigh less against its GEMMs.

    python benchmarks/train.py [--iters 400] [--out benchmarks/results/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--ffn-hidden-size", "512",
         "--seq-length", "128", "--micro-batch-size", "8", "--global-batch-size", "16", "--lr", "2e-3",
         "--lr-warmup-iters", "20", "--log-interval", "10", "--seed", "1234"]
WIDE = {"--hidden-size": "256", "--ffn-hidden-size": "1024", "--seq-length": "256"}


def shape_flags(overrides=None):
    flags = list(SHAPE)
    for flag, value in (overrides or {}).items():
        flags[flags.index(flag) + 1] = value
    return flags


def tokens_per_step(flags):
    return int(flags[flags.index("--global-batch-size") + 1]) * int(flags[flags.index("--seq-length") + 1])


def median_step_s(history, flags):
    """Step time from each logged interval's tokens/s, the first interval (start-up) left out."""
    return statistics.median(tokens_per_step(flags) / r["tokens_per_s"] for r in history[1:])


def run(name, extra, iters, workdir, shape=SHAPE):
    plots = os.path.join(workdir, name)
    cmd = [sys.executable, "-m", "megatron_switch.train", "--nproc-per-node", "2", *shape,
           "--train-iters", str(iters), "--plots-dir", plots, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(plots, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def smooth(values, window=3):
    return [statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def steps_to_reach(history, target):
    losses = smooth([r["lm_loss"] for r in history])
    for record, loss in zip(history, losses):
        if loss <= target:
            return record["iteration"]
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--wide-iters", type=int, default=40)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train.json"))
    args = parser.parse_args()
    models = {
        "dense": [],
        "switch-8": ["--moe-switch", "--num-experts", "8", "--moe-layer-freq", "2",
                     "--expert-model-parallel-size", "2"],
        "switch-32": ["--moe-switch", "--num-experts", "32", "--moe-layer-freq", "2",
                      "--expert-model-parallel-size", "2"],
        # the paper's fastest setting (Table 1): capacity factor 1.0 instead of the default 1.25
        "switch-8-cf1.0": ["--moe-switch", "--num-experts", "8", "--moe-layer-freq", "2",
                           "--expert-model-parallel-size", "2", "--moe-expert-capacity-factor", "1.0"],
    }
    with tempfile.TemporaryDirectory() as workdir:
        histories = {name: run(name, extra, args.iters, workdir) for name, extra in models.items()}
        wide = shape_flags(WIDE)
        wide_step = {name: median_step_s(run(f"{name}-wide", extra, args.wide_iters, workdir, wide), wide)
                     for name, extra in models.items()}
    dense_final = smooth([r["lm_loss"] for r in histories["dense"]])[-1]
    dense_steps = steps_to_reach(histories["dense"], dense_final)
    step_time = {name: median_step_s(history, SHAPE) for name, history in histories.items()}
    summary = {}
    for name, history in histories.items():
        reached = steps_to_reach(history, dense_final)
        summary[name] = dict(
            final_lm_loss=round(smooth([r["lm_loss"] for r in history])[-1], 4),
            median_step_s=round(step_time[name], 4),
            step_time_vs_dense=round(step_time[name] / step_time["dense"], 3),
            median_step_s_wide=round(wide_step[name], 4),
            step_time_vs_dense_wide=round(wide_step[name] / wide_step["dense"], 3),
            steps_to_dense_final_loss=reached,
            speedup_in_steps=round(dense_steps / reached, 2) if reached else None)
    report = dict(benchmark="train", iters=args.iters, shape=SHAPE, wide_iters=args.wide_iters,
                  wide_shape=shape_flags(WIDE), dense_final_lm_loss=round(dense_final, 4),
                  summary=summary, histories=histories)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history in histories.items():
        ax.plot([r["iteration"] for r in history], smooth([r["lm_loss"] for r in history]), label=name)
    ax.axhline(dense_final, color="grey", linestyle=":", label="dense final loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("train lm loss (smoothed)")
    ax.set_title("Dense vs Switch GPT, equal FLOPs per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=120)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
