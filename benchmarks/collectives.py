"""What one expert-parallel all-to-all costs inside a training step, against the same call alone.

The train benchmark's Switch models make 8 all-to-alls per step (2 Switch layers, dispatch and combine,
forward and backward) where the dense model makes one gradient all-reduce. This measures
`all_to_all_single` of one Switch layer's capacity buffer ([E * C, h] float32, E=8, cf 1.25,
1024 tokens, h=128: 0.65 MB) between 2 local processes, right after `--work-ms` of single-threaded
GEMMs on each rank (0: back to back, as microbenchmarks measure it), and the gradient all-reduce of
the dense model's parameters (0.8 M float32) for comparison.

    python benchmarks/collectives.py [--backend gloo] [--out benchmarks/results/collectives.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A2A_ROWS, HIDDEN = 8 * 160, 128  # E * C rows: E=8, C = ceil(1.25 * 1024 / 8)
DENSE_PARAMS = 800_000
REPEATS = 100


def _time_after_work(op, work_ms: float, gemm: torch.Tensor) -> dict:
    """Median and mean milliseconds of `op()` when each rank first computes for about `work_ms`."""
    gemm_s = _gemm_seconds(gemm)
    n_gemms = round(work_ms / 1e3 / gemm_s) if work_ms else 0
    times = []
    dist.barrier()
    for _ in range(REPEATS):
        for _ in range(n_gemms):
            gemm @ gemm
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return {"median_ms": round(statistics.median(times) * 1e3, 3), "mean_ms": round(statistics.mean(times) * 1e3, 3)}


def _gemm_seconds(gemm: torch.Tensor) -> float:
    start = time.perf_counter()
    for _ in range(5):
        gemm @ gemm
    return (time.perf_counter() - start) / 5


def _worker(rank: int, world: int, port: int, backend: str, work_ms, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    torch.set_num_threads(1)
    gemm = torch.randn(256, 256)
    x, y = torch.randn(A2A_ROWS, HIDDEN), torch.empty(A2A_ROWS, HIDDEN)
    grads = torch.randn(DENSE_PARAMS)
    for _ in range(5):
        dist.all_to_all_single(y, x)
        dist.all_reduce(grads)
    rows = []
    for ms in work_ms:
        a2a = _time_after_work(lambda: dist.all_to_all_single(y, x), ms, gemm)
        allreduce = _time_after_work(lambda: dist.all_reduce(grads), ms, gemm)
        rows.append({"work_ms_before": ms, "all_to_all": a2a, "dense_grad_all_reduce": allreduce})
    if rank == 0:
        result = {"benchmark": "collectives", "backend": backend, "processes": world,
                  "all_to_all_bytes": A2A_ROWS * HIDDEN * 4, "all_reduce_bytes": DENSE_PARAMS * 4, "rows": rows}
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        for row in rows:
            print(row)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--work-ms", type=float, nargs="+", default=[0, 2, 5, 10])
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "collectives.json"))
    args = parser.parse_args()
    mp.spawn(_worker, args=(2, args.port, args.backend, args.work_ms, args.out), nprocs=2)


if __name__ == "__main__":
    main()
