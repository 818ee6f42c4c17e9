"""A Switch GPT saved with megatron's dist_checkpointing at one expert-parallel size loads at another."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_switch import SwitchMLP, initialize_parallel
from tests.helpers import spawn
from tests.test_gpt import BATCH, SEQ, VOCAB, build_gpt

# Switch and dense MLPs alternate, so layers are keyed one by one (not stacked on a layer axis).
METADATA = {"non_homogeneous_layers": True}


def logits_of(model):
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    model.eval()
    with torch.no_grad():
        return model(tokens, position_ids, attention_mask=None)


def save_worker(rank, world_size, ep, ckpt_dir, out_path):
    from megatron.core import dist_checkpointing

    from megatron_switch.compat import enable_cpu_support

    enable_cpu_support()
    initialize_parallel(ep=ep, num_experts=4, backend="gloo")
    model = build_gpt(ep)
    with torch.no_grad():  # move away from the seeded init, so loading has something to prove
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    if rank == 0:
        import os

        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(metadata=METADATA), ckpt_dir)
    torch.save(logits_of(model), f"{out_path}.{rank}")


def load_worker(rank, world_size, ep, ckpt_dir, out_path):
    from megatron.core import dist_checkpointing

    from megatron_switch.compat import enable_cpu_support

    enable_cpu_support()
    initialize_parallel(ep=ep, num_experts=4, backend="gloo")
    model = build_gpt(ep)
    state = dist_checkpointing.load(model.sharded_state_dict(metadata=METADATA), ckpt_dir)
    model.load_state_dict(state)
    experts = [m.experts for m in model.modules() if isinstance(m, SwitchMLP)]
    assert all(e.num_local_experts == 4 // ep for e in experts)
    torch.save(logits_of(model), f"{out_path}.{rank}")


def test_dist_checkpoint_reshards_across_expert_parallel_sizes(tmp_path):
    spawn(save_worker, 2, 2, str(tmp_path / "ckpt"), str(tmp_path / "saved"))
    spawn(load_worker, 1, 1, str(tmp_path / "ckpt"), str(tmp_path / "ep1"))
    spawn(load_worker, 2, 2, str(tmp_path / "ckpt"), str(tmp_path / "ep2"))
    saved = torch.load(tmp_path / "saved.0")
    torch.testing.assert_close(torch.load(tmp_path / "ep1.0"), saved, rtol=1e-5, atol=1e-5)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"ep2.{rank}"), saved, rtol=0, atol=0)
