"""The paper's headline at toy scale, in the paper's own setting: a dense T5 vs Switch T5s of equal FLOPs
per token (E = 8, 32, 128 experts, capacity factor 1.25, every 2nd FFN of encoder and decoder a Switch
layer), trained on T5's span corruption of the embedded corpus.

Every model has the same shape (layers per stack, hidden, FFN width); a Switch layer replaces an FFN by
E experts of that width, so top-1 routing keeps the FLOPs per token (plus the router's h x E). Each runs
`megatron-switch train --model t5` with 2 processes (dense: DP=2; Switch: EP=2), the same data order,
optimiser, schedule and the paper's initialisation (truncated normal, scale 0.1, for every weight:
with megatron's N(0, 0.02) the routers of this toy model collapse for hundreds of steps, dropping
50-90% of the tokens, and every Switch model ends behind dense). Reported: each model's final loss, its
median step time, and the steps and wall-clock seconds it needs to reach the dense model's final loss
(smoothed train loss), against the paper's Fig. 5 / Table 1 (Switch-Base 64 experts: T5-Base's quality
in 7.5x fewer steps; more experts, faster). On a shared CPU the times are noisy and the expert GEMMs
are small, so wall-clock favours dense far more than on accelerators; steps are the layout-free
measure.

    python benchmarks/train_t5.py [--iters 300] [--out benchmarks/results/train_t5.json]
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
SHAPE = ["--model", "t5", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--ffn-hidden-size", "256", "--encoder-seq-length", "128", "--micro-batch-size", "8",
         "--global-batch-size", "16", "--lr", "3e-3", "--lr-warmup-iters", "20", "--log-interval", "5",
         "--seed", "1234", "--init-method", "switch"]  # the paper's init (sec. 2.4, scale 0.1) for every weight
SWITCH = ["--moe-switch", "--moe-layer-freq", "2", "--expert-model-parallel-size", "2",
          "--moe-expert-capacity-factor", "1.25"]
MODELS = {"dense": [], **{f"switch-{e}": [*SWITCH, "--num-experts", str(e)] for e in (8, 32, 128)}}


def run(name: str, extra: list, iters: int, workdir: str) -> list:
    plots = os.path.join(workdir, name)
    cmd = [sys.executable, "-m", "megatron_switch.train", "--nproc-per-node", "2", *SHAPE,
           "--train-iters", str(iters), "--plots-dir", plots, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(plots, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def smooth(values: list, window: int = 5) -> list:
    return [statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def steps_to_reach(history: list, target: float):
    for record, loss in zip(history, smooth([r["lm_loss"] for r in history])):
        if loss <= target:
            return record["iteration"]
    return None


def median_step_s(history: list, tokens_per_step: int) -> float:
    """From each logged interval's tokens/s (encoder + decoder tokens), the first (start-up) left out."""
    return statistics.median(tokens_per_step / r["tokens_per_s"] for r in history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_t5.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        histories = {name: run(name, extra, args.iters, workdir) for name, extra in MODELS.items()}
    from megatron_switch.data.span_corruption import corrupted_lengths, random_spans_helper

    encoder = int(SHAPE[SHAPE.index("--encoder-seq-length") + 1])
    decoder = corrupted_lengths(random_spans_helper(encoder)[0])[1]
    tokens_per_step = int(SHAPE[SHAPE.index("--global-batch-size") + 1]) * (encoder + decoder)
    dense_final = smooth([r["lm_loss"] for r in histories["dense"]])[-1]
    dense_steps = steps_to_reach(histories["dense"], dense_final)
    step_s = {name: median_step_s(history, tokens_per_step) for name, history in histories.items()}
    summary = {}
    for name, history in histories.items():
        reached = steps_to_reach(history, dense_final)
        summary[name] = dict(
            final_lm_loss=round(smooth([r["lm_loss"] for r in history])[-1], 4),
            median_step_s=round(step_s[name], 4),
            step_time_vs_dense=round(step_s[name] / step_s["dense"], 3),
            steps_to_dense_final_loss=reached,
            speedup_in_steps=round(dense_steps / reached, 2) if reached else None,
            seconds_to_dense_final_loss=round(reached * step_s[name], 1) if reached else None,
            speedup_in_time=round(dense_steps * step_s["dense"] / (reached * step_s[name]), 2) if reached else None)
    report = dict(benchmark="train_t5", iters=args.iters, shape=SHAPE, switch=SWITCH,
                  decoder_seq_length=decoder, dense_final_lm_loss=round(dense_final, 4),
                  summary=summary, histories=histories)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, history in histories.items():
        losses = smooth([r["lm_loss"] for r in history])
        steps = [r["iteration"] for r in history]
        by_step.plot(steps, losses, label=name)
        by_time.plot([s * step_s[name] for s in steps], losses, label=name)
    for ax, xlabel in ((by_step, "iteration"), (by_time, "seconds (median step time x steps)")):
        ax.axhline(dense_final, color="grey", linestyle=":", label="dense final loss")
        ax.set_xlabel(xlabel)
    by_step.set_ylabel("train lm loss (span corruption, smoothed)")
    by_step.legend()
    fig.suptitle("Dense T5 vs Switch T5, equal FLOPs per token (capacity 1.25, every 2nd FFN)")
    fig.tight_layout()
    fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=120)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
