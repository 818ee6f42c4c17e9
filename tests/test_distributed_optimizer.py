"""`--use-distributed-optimizer` (ZeRO-1) on CPU: who owns which parameter, that each rank keeps only
its share of the optimizer state, that training is the plain optimizer's after either gradient
reduction (megatron-core's DDP, the default, or the local one), and that checkpoints move between
runs with and without it."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from megatron_switch.training.ownership import assign_owners
from tests.helpers import spawn
from tests.test_train import EXACT, SMALL, metrics, run_train

SHARDED = "--use-distributed-optimizer"
# Two processes without expert parallelism: data parallel 2 and expert-data parallel 2, so dense
# and expert parameters are both sharded.
DP2 = ["--nproc-per-node", "2", *SMALL, *EXACT, "--global-batch-size", "4", "--lr-decay-iters", "6",
       "--lr-warmup-iters", "2"]
KEYS = ("lm_loss", "aux_loss", "z_loss", "dropped_fraction", "grad_norm", "lr")


@given(st.lists(st.integers(1, 10_000), max_size=40), st.integers(1, 8))
def test_owners_are_balanced(numels, ranks):
    owners = assign_owners(numels, ranks)
    assert len(owners) == len(numels) and all(0 <= owner < ranks for owner in owners)
    loads = [sum(n for n, owner in zip(numels, owners) if owner == rank) for rank in range(ranks)]
    if numels:
        assert max(loads) - min(loads) <= max(numels)


def _tiny_args(*extra: str):
    from megatron_switch.training.arguments import parse_args

    return parse_args(["--moe-switch", "--num-experts", "4", "--num-layers", "2", "--hidden-size", "32",
                       "--num-attention-heads", "2", "--seq-length", "16", "--moe-layer-freq", "1",
                       "--untie-embeddings-and-output-weights", *extra])


def _build(args):
    from megatron.core.transformer.module import Float16Module

    from megatron_switch.training.model import build_model
    from megatron_switch.training.optimizer import Optimization

    model = build_model(args, 258)
    if args.bf16:
        model = Float16Module(model.config, model)
    return model, Optimization(model, args, megatron_ddp=False)


def _fake_step(optimization, seed: int) -> float:
    """A step on gradients drawn from `seed` (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    optimization.zero_grad()
    for p in optimization.params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
    return optimization.step()


@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_one_rank_sharded_is_the_plain_optimizer(single_process_groups, precision):
    from megatron_switch.compat import apply_cpu_shims

    apply_cpu_shims()
    plain_model, plain = _build(_tiny_args(*precision))
    sharded_model, sharded = _build(_tiny_args(*precision, SHARDED))
    assert [id(p) for p in sharded.owned] == [id(p) for p in sharded.params]
    for seed in (1, 2):
        assert _fake_step(sharded, seed) == _fake_step(plain, seed)
    for a, b in zip(plain_model.parameters(), sharded_model.parameters()):
        assert torch.equal(a, b)


def _gather(obj, group) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _ownership_worker(rank, world_size, tmp):
    from megatron.core import parallel_state

    from megatron_switch.compat import apply_cpu_shims
    from megatron_switch.parallel import initialize_parallel
    from megatron_switch.training.checkpointing import load_checkpoint, save_checkpoint
    from megatron_switch.training.optimizer import Optimization

    initialize_parallel(ep=2, num_experts=4)  # 4 ranks: data parallel 4, expert-data parallel 2
    apply_cpu_shims()
    args = _tiny_args("--bf16", "--expert-model-parallel-size", "2", SHARDED)
    model, optimization = _build(args)
    _fake_step(optimization, seed=1)
    name = {id(p): n for n, p in model.named_parameters()}
    for dense, group in ((True, parallel_state.get_data_parallel_group()),
                         (False, parallel_state.get_expert_data_parallel_group())):
        mine = [p for p in optimization.params if getattr(p, "allreduce", True) == dense]
        owned = {name[id(p)] for p in optimization.owned if getattr(p, "allreduce", True) == dense}
        every = _gather(owned, group)
        assert set().union(*every) == {name[id(p)] for p in mine}  # every parameter has an owner
        assert sum(map(len, every)) == len(mine)  # exactly one
        assert all(every), "each rank owns a share"
        # Adam's moments and the float32 masters exist for the owned parameters only.
        masters = {id(m) for m, p in zip(optimization.masters, optimization.owned)
                   if getattr(p, "allreduce", True) == dense}
        held = [s for m, s in optimization.optimizer.state.items() if id(m) in masters]
        assert len(held) == len(owned)
        sizes = _gather(sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in held), group)
        assert sum(sizes) == 2 * sum(p.numel() for p in mine)
        assert max(sizes) < 2 * sum(p.numel() for p in mine)
        # After the step every replica holds the owners' updated values.
        values = torch.cat([p.detach().float().reshape(-1) for p in mine])
        assert all(torch.equal(values, other) for other in _gather(values, group))
    assert all(m.dtype == torch.float32 for m in optimization.masters)
    assert len(optimization.masters) == len(optimization.owned) < len(optimization.params)

    # A rank that owns nothing: one trainable parameter, owned by data-parallel rank 0.
    for p in model.parameters():
        p.requires_grad_(False)
    model.module.decoder.final_layernorm.bias.requires_grad_(True)
    one = Optimization(model, args, megatron_ddp=False)
    owns = bool(one.owned)
    assert owns == (parallel_state.get_data_parallel_rank() == 0)
    _fake_step(one, seed=2)
    common = {"iteration": 1, "consumed_train_samples": 0}
    save_checkpoint(tmp, 1, model, one.optimizer, one.params_in_optimizer_order, one.scheduler, common)
    again = Optimization(model, args, megatron_ddp=False)
    load_checkpoint(tmp, model, again.optimizer, again.params_in_optimizer_order, again.scheduler)
    steps = [float(s["step"]) for s in again.optimizer.state.values()]
    assert steps == ([1.0] if owns else [])


def test_each_rank_keeps_only_its_share_of_the_optimizer_state(tmp_path):
    spawn(_ownership_worker, 4, str(tmp_path / "ckpt"))


def test_fp32_training_matches_the_plain_optimizer_after_either_reduction(tmp_path):
    """Plain and sharded, after megatron-core's DDP (buckets reduced during backward) and after the
    local reduction: at DP=2 in float32 all four runs are the same run."""
    runs = {"megatron": ["--overlap-grad-reduce"], "megatron-sharded": ["--overlap-grad-reduce", SHARDED],
            "local": ["--ddp-impl", "local"], "local-sharded": ["--ddp-impl", "local", SHARDED]}
    for name, flags in runs.items():
        run_train([*DP2, *flags, "--train-iters", "4", "--plots-dir", str(tmp_path / name)], tmp_path)
    for name in runs:
        _assert_same(metrics(tmp_path / "megatron"), metrics(tmp_path / name))


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    """Six --bf16 iterations at DP=2 without and with the distributed optimizer, each saving at 3 and 6."""
    root = tmp_path_factory.mktemp("bf16")
    for name, flags in (("plain", []), ("sharded", [SHARDED])):
        run_train([*DP2, "--bf16", *flags, "--train-iters", "6", "--save-interval", "3",
                   "--save", str(root / name)], root)
    return root


def _assert_same(expected, got, rel=0.0):
    assert [r["iteration"] for r in got] == [r["iteration"] for r in expected]
    for a, b in zip(expected, got):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=0.0), (key, a, b)


def test_bf16_training_matches_the_plain_optimizer(bf16_runs):
    _assert_same(metrics(bf16_runs / "plain" / "plots"), metrics(bf16_runs / "sharded" / "plots"), rel=1e-5)


def _at_iteration_3(run, tmp_path):
    """A copy of `run`'s checkpoints whose latest is iteration 3."""
    root = tmp_path / f"{run.name}-at-3"
    shutil.copytree(run / "iter_0000003", root / "iter_0000003")
    (root / "latest_checkpointed_iteration.txt").write_text("3")
    return root


def test_checkpoints_hold_the_same_tensors_with_and_without_it(bf16_runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    saved = {}
    for name in ("plain", "sharded"):
        dcp_to_torch_save(str(bf16_runs / name / "iter_0000003"), str(tmp_path / f"{name}.pt"))
        saved[name] = torch.load(tmp_path / f"{name}.pt", weights_only=False)
    assert saved["plain"].keys() == saved["sharded"].keys()
    optimizer_keys = [k for k in saved["plain"] if k.startswith("optimizer.")]
    assert any(k.startswith("optimizer.main_param.") for k in optimizer_keys)
    assert any(".experts." in k for k in optimizer_keys)
    for key, value in saved["plain"].items():  # the same training: model and optimizer alike
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, saved["sharded"][key]), key


@pytest.mark.parametrize("saved_by,resumed_with", [("sharded", []), ("plain", [SHARDED])],
                         ids=["sharded-to-plain", "plain-to-sharded"])
def test_resume_across_the_flag_is_bit_identical(bf16_runs, tmp_path, saved_by, resumed_with):
    resumed = run_train([*DP2, "--bf16", *resumed_with, "--train-iters", "6",
                         "--load", str(_at_iteration_3(bf16_runs / saved_by, tmp_path)),
                         "--plots-dir", str(tmp_path / "resumed")], tmp_path)
    assert "at iteration 3" in resumed.stdout
    straight = metrics(bf16_runs / "plain" / "plots")
    _assert_same(straight[3:], metrics(tmp_path / "resumed"))


def test_sbatch_plans_a_train_job_with_it_only_when_the_job_has_it(capsys):
    from megatron_switch.planning.cli import sbatch_main
    from tests.test_planning import _run

    job = ["--preset", "switch-base-128-gpt", "--nodes", "4", "--save", "/ckpt"]
    plain = _run(sbatch_main, job)
    sharded = _run(sbatch_main, [*job, f"--extra-args={SHARDED}"])
    assert "optimizer state not sharded" in plain and SHARDED not in plain
    assert ", distributed optimizer" in sharded and f"{SHARDED} \\" in sharded
    cpu = _run(sbatch_main, ["--preset", "tiny", "--nodes", "1", "--cpu", "--save", "/ckpt", f"--extra-args={SHARDED}"])
    assert ", distributed optimizer" in cpu
    with pytest.raises(SystemExit) as exit_info:
        sbatch_main([*job, "--no-distributed-optimizer", f"--extra-args={SHARDED}"])
    assert exit_info.value.code == 2 and "contradicts" in capsys.readouterr().err
