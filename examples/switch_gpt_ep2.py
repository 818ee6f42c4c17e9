"""Train a tiny Switch GPT on CPU with expert parallelism across local processes.

    python examples/switch_gpt_ep2.py [--nproc 2] [--ep 2] [--iters 200]

Each process is a data-parallel replica holding num_experts / EP experts of every Switch layer;
tokens travel to their experts through gloo all-to-alls. The corpus is the Python standard
library's own source (bytes as tokens), present wherever Python is.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stdlib_bytes(limit: int = 4 << 20) -> torch.Tensor:
    """Up to `limit` bytes of the embedded corpus (the standard library's .py files) as tokens."""
    from megatron_switch.data.corpus import stdlib_sources

    chunks, total = [], 0
    for path in stdlib_sources():
        if total >= limit:
            break
        with open(path, "rb") as f:
            chunks.append(f.read())
        total += len(chunks[-1])
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def worker(rank: int, args) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(args.port), TORCHELASTIC_USE_AGENT_STORE="True")  # (main's store)
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_switch import SwitchConfig, get_switch_gpt_layer_spec, initialize_parallel, switch_stats
    from megatron_switch.initialization import switch_init_method
    from megatron_switch.training.gradients import allreduce_gradients

    switch = SwitchConfig(num_experts=args.experts, expert_interval=2, capacity_factor=1.25)
    initialize_parallel(ep=args.ep, num_experts=switch.num_experts, backend="gloo")
    torch.manual_seed(1234)
    init = switch_init_method(switch.init_scale)
    config = TransformerConfig(num_layers=4, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4,
                               use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                               init_method=init, output_layer_init_method=init)
    model = GPTModel(config=config, transformer_layer_spec=get_switch_gpt_layer_spec(config, switch),
                     vocab_size=256, max_sequence_length=args.seq_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    data = stdlib_bytes()
    dp_rank = parallel_state.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(1000 + dp_rank)
    position_ids = torch.arange(args.seq_length).expand(args.micro_batch_size, -1)
    start = time.perf_counter()
    for iteration in range(1, args.iters + 1):
        lr = args.lr * min(1.0, iteration / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * iteration / args.iters)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, data.numel() - args.seq_length - 1, (args.micro_batch_size,), generator=generator)
        window = torch.stack([data[o:o + args.seq_length + 1] for o in offsets.tolist()])
        loss = model(window[:, :-1], position_ids, attention_mask=None, labels=window[:, 1:]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        allreduce_gradients(model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # local norm: a demo, not a trainer
        optimizer.step()
        if iteration % args.log_interval == 0 or iteration == 1:
            stats = list(switch_stats(model).values())
            reduced = torch.stack([loss.detach(), sum(s.aux_loss for s in stats), sum(s.dropped_fraction for s in stats) / len(stats)])
            torch.distributed.all_reduce(reduced, group=parallel_state.get_data_parallel_group())
            reduced /= parallel_state.get_data_parallel_world_size()
            tokens_per_s = iteration * args.nproc * args.micro_batch_size * args.seq_length / (time.perf_counter() - start)
            if rank == 0:
                print(f"iter {iteration:5d} | lm loss {reduced[0]:.4f} | aux loss {reduced[1]:.5f} | "
                      f"dropped {reduced[2]:.3f} | lr {lr:.2e} | {tokens_per_s:,.0f} tokens/s", flush=True)
    from megatron_switch.parallel import destroy_parallel

    destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--log-interval", type=int, default=20)
    parser.add_argument("--port", type=int, default=0, help="Where the processes meet (default: a free port).")
    args = parser.parse_args()
    import datetime

    from torch.distributed import TCPStore

    from megatron_switch.parallel import validate_layout

    validate_layout(args.nproc, ep=args.ep, num_experts=args.experts)
    # The processes meet at this process's store, bound at once (a port picked by the system when --port is
    # 0): two runs on one machine never meet at one port.
    store = TCPStore("127.0.0.1", args.port, args.nproc, True, datetime.timedelta(minutes=10), wait_for_workers=False)
    args.port = store.port
    torch.multiprocessing.start_processes(worker, args=(args,), nprocs=args.nproc, start_method="spawn")


if __name__ == "__main__":
    main()
