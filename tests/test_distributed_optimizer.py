"""`--use-distributed-optimizer` (ZeRO-1) on CPU: who owns which parameter, that each rank keeps only
its share of the optimizer state, that training is the plain optimizer's after either gradient
reduction (megatron-core's DDP, the default, or the local one), and that checkpoints move between
runs with and without it."""

from __future__ import annotations

import math
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


def _build(args, megatron_ddp: bool):
    from megatron.core.transformer.module import Float16Module

    from megatron_switch.training.model import build_model
    from megatron_switch.training.optimizer import Optimization

    model = build_model(args, 258)
    if args.bf16:
        model = Float16Module(model.config, model)
    return model, Optimization(model, args, megatron_ddp=megatron_ddp)


def _fake_step(optimization, seed: int) -> float:
    """A step on gradients drawn from `seed` (the same on every rank), put where the backward
    pass would put them (megatron DDP's main_grad buffers, or .grad)."""
    generator = torch.Generator().manual_seed(seed)
    optimization.zero_grad()
    for p in optimization.params:
        grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        if optimization.megatron_ddp:
            p.main_grad.copy_(grad)
        else:
            p.grad = grad
    return optimization.step()


IMPLS = pytest.mark.parametrize("megatron_ddp", [True, False], ids=["megatron-ddp", "local"])


@IMPLS
@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_one_rank_sharded_is_the_plain_optimizer(single_process_groups, precision, megatron_ddp):
    from megatron_switch.compat import enable_cpu_support

    enable_cpu_support()
    plain_model, plain = _build(_tiny_args(*precision), megatron_ddp)
    sharded_model, sharded = _build(_tiny_args(*precision, SHARDED), megatron_ddp)
    assert [(id(p), a, b) for p, a, b in sharded.pieces] == [(id(p), 0, p.numel()) for p in sharded.params]
    for seed in (1, 2):
        assert _fake_step(sharded, seed) == _fake_step(plain, seed)
    for a, b in zip(plain_model.parameters(), sharded_model.parameters()):
        assert torch.equal(a, b)


@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.data())
def test_flat_range_blocks_are_contiguous_rectangles_covering_the_range(shape, data):
    from megatron_switch.training.optimizer_state import flat_range_blocks

    numel = int(torch.tensor(shape).prod())
    start = data.draw(st.integers(0, numel - 1))
    end = data.draw(st.integers(start + 1, numel))
    t = torch.arange(numel).view(shape)
    covered = []
    blocks = flat_range_blocks(shape, start, end)
    assert len(blocks) <= 2 * len(shape) - 1
    for offset, block, first in blocks:
        region = t[tuple(slice(o, o + b) for o, b in zip(offset, block))]
        assert region.shape == tuple(block)
        assert torch.equal(region.reshape(-1), torch.arange(first, first + region.numel()))  # a contiguous run
        covered.extend(region.reshape(-1).tolist())
    assert covered == list(range(start, end))


def _gather(obj, group) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _ownership_worker(rank, world_size, tmp, megatron_ddp):
    from megatron.core import parallel_state

    from megatron_switch.compat import enable_cpu_support
    from megatron_switch.parallel import initialize_parallel
    from megatron_switch.training.checkpointing import load_checkpoint, save_checkpoint
    from megatron_switch.training.optimizer import Optimization

    initialize_parallel(ep=2, num_experts=4)  # 4 ranks: data parallel 4, expert-data parallel 2
    enable_cpu_support()
    # Rows of 40 elements: megatron's shard boundaries (multiples of 32 here) cut some of them.
    args = _tiny_args("--bf16", "--expert-model-parallel-size", "2", SHARDED, "--hidden-size", "40")
    model, optimization = _build(args, megatron_ddp)
    _fake_step(optimization, seed=1)
    name = {id(p): n for n, p in model.named_parameters()}
    for dense, group in ((True, parallel_state.get_data_parallel_group()),
                         (False, parallel_state.get_expert_data_parallel_group())):
        mine = [p for p in optimization.params if getattr(p, "allreduce", True) == dense]
        pieces = [(name[id(p)], a, b) for p, a, b in optimization.pieces if getattr(p, "allreduce", True) == dense]
        every = [piece for share in _gather(pieces, group) for piece in share]
        for p in mine:  # the group's pieces of each parameter cover its elements exactly once
            ranges = sorted((a, b) for n, a, b in every if n == name[id(p)])
            assert ranges[0][0] == 0 and ranges[-1][1] == p.numel(), name[id(p)]
            assert all(b == a2 for (_, b), (a2, _) in zip(ranges, ranges[1:])), name[id(p)]
        assert all(_gather(len(pieces), group)), "each rank updates a share"
        # Adam's moments and the float32 masters exist for this rank's pieces only.
        masters = [m for m, (p, _, _) in zip(optimization.masters, optimization.pieces)
                   if getattr(p, "allreduce", True) == dense]
        held = [optimization.optimizer.state[m] for m in masters]
        sizes = _gather(sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in held), group)
        assert sum(sizes) == 2 * sum(p.numel() for p in mine)
        assert max(sizes) < 2 * sum(p.numel() for p in mine)
        # After the step every replica holds the same updated values.
        values = torch.cat([p.detach().float().reshape(-1) for p in mine])
        assert all(torch.equal(values, other) for other in _gather(values, group))
    assert all(m.dtype == torch.float32 for m in optimization.masters)
    assert sum(m.numel() for m in optimization.masters) < sum(p.numel() for p in optimization.params)
    if megatron_ddp:
        _pieces_round_trip(model, optimization, tmp)
        return

    # A rank that owns nothing: one trainable parameter, owned by data-parallel rank 0.
    for p in model.parameters():
        p.requires_grad_(False)
    model.module.decoder.final_layernorm.bias.requires_grad_(True)
    one = Optimization(model, args, megatron_ddp=False)
    owns = bool(one.pieces)
    assert owns == (parallel_state.get_data_parallel_rank() == 0)
    _fake_step(one, seed=2)
    common = {"iteration": 1, "consumed_train_samples": 0}
    save_checkpoint(tmp, 1, model, one.checkpointed, one.scheduler, common)
    again = Optimization(model, args, megatron_ddp=False)
    load_checkpoint(tmp, model, again.checkpointed, again.scheduler)
    steps = [float(s["step"]) for s in again.optimizer.state.values()]
    assert steps == ([1.0] if owns else [])


def _pieces_round_trip(model, optimization, tmp) -> None:
    """Save, wipe the optimizer state and masters, load: every piece's state comes back bit for bit,
    also pieces that start or end inside a row (saved as several blocks)."""
    from megatron_switch.training.checkpointing import load_checkpoint, save_checkpoint
    from megatron_switch.training.optimizer_state import flat_range_blocks

    blocks = [len(flat_range_blocks(p.shape, a, b)) for p, a, b in optimization.pieces]
    assert max(_gather(max(blocks), dist.group.WORLD)) > 1, "some piece must cut rows"
    optimizer = optimization.optimizer
    before = [(m.clone(), *(optimizer.state[m][k].clone() for k in ("exp_avg", "exp_avg_sq")))
              for m in optimization.masters]
    save_checkpoint(tmp, 1, model, optimization.checkpointed, optimization.scheduler,
                    {"iteration": 1, "consumed_train_samples": 0})
    with torch.no_grad():
        for m, (p, _, _) in zip(optimization.masters, optimization.pieces):
            optimizer.state[m]["exp_avg"].zero_()
            optimizer.state[m]["exp_avg_sq"].zero_()
            if p.dtype != torch.float32:
                m.zero_()
    load_checkpoint(tmp, model, optimization.checkpointed, optimization.scheduler)
    for m, (master, exp_avg, exp_avg_sq) in zip(optimization.masters, before):
        assert torch.equal(m, master)
        assert torch.equal(optimizer.state[m]["exp_avg"], exp_avg)
        assert torch.equal(optimizer.state[m]["exp_avg_sq"], exp_avg_sq)


@IMPLS
def test_each_rank_keeps_only_its_share_of_the_optimizer_state(tmp_path, megatron_ddp):
    spawn(_ownership_worker, 4, str(tmp_path / "ckpt"), megatron_ddp)


def test_fp32_training_matches_the_plain_optimizer_after_either_reduction(tmp_path):
    """Plain and sharded, after megatron-core's DDP (buckets reduced during backward) and after the
    local reduction: at DP=2 in float32 all four runs are the same run, bit for bit but for the
    sharded run after megatron's DDP, whose gradient norm is summed from reduce-scattered shards
    (another order of the same float32 sums)."""
    runs = {"megatron": ["--overlap-grad-reduce"], "megatron-sharded": ["--overlap-grad-reduce", SHARDED],
            "local": ["--ddp-impl", "local"], "local-sharded": ["--ddp-impl", "local", SHARDED]}
    for name, flags in runs.items():
        run_train([*DP2, *flags, "--train-iters", "4", "--plots-dir", str(tmp_path / name)], tmp_path)
    for name in runs:
        _assert_same(metrics(tmp_path / "megatron"), metrics(tmp_path / name),
                     rel=1e-6 if name == "megatron-sharded" else 0.0)


def test_bf16_micro_batches_accumulate_in_float32_after_either_reduction(tmp_path):
    """Two micro-batches per rank under --bf16: megatron-core's DDP accumulates them in its float32
    buffers, the local reduction in each bf16 parameter's float32 `main_grad`: the same run, bit for
    bit (accumulated in bf16 `.grad`, the local run's grad norm was off by about 1e-4 relative)."""
    runs = {"megatron": [], "local": ["--ddp-impl", "local"]}
    for name, flags in runs.items():
        run_train([*DP2, "--bf16", "--global-batch-size", "8", *flags, "--train-iters", "4",
                   "--plots-dir", str(tmp_path / name)], tmp_path)
    _assert_same(metrics(tmp_path / "megatron"), metrics(tmp_path / "local"))


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    """Six --bf16 iterations at DP=2 without and with the distributed optimizer, each saving at 3 and 6."""
    root = tmp_path_factory.mktemp("bf16")
    for name, flags in (("plain", []), ("sharded", [SHARDED])):
        run_train([*DP2, "--bf16", *flags, "--train-iters", "6", "--save-interval", "3",
                   "--save", str(root / name)], root)
    return root


def _assert_same(expected, got, rel=0.0):
    """Every metric equal (rel 0) or within `rel`; then also up to two of a step's 4 x 64 tokens may
    have crossed the capacity edge (a routing decision is discrete: a last-bit difference in a
    bf16 weight can move a token from one expert to another)."""
    assert [r["iteration"] for r in got] == [r["iteration"] for r in expected]
    for a, b in zip(expected, got):
        for key in KEYS:
            slack = 2 / (4 * 64) if rel and key == "dropped_fraction" else 0.0
            assert b[key] == pytest.approx(a[key], rel=rel, abs=slack), (key, a, b)


BF16_REL = 1e-3  # plain vs sharded in bf16: float32 norms summed in another order, then bf16 rounding


def test_bf16_training_matches_the_plain_optimizer(bf16_runs):
    _assert_same(metrics(bf16_runs / "plain" / "plots"), metrics(bf16_runs / "sharded" / "plots"), rel=BF16_REL)


def _at_iteration_3(run, tmp_path):
    """A copy of `run`'s checkpoints whose latest is iteration 3."""
    root = tmp_path / f"{run.name}-at-3"
    shutil.copytree(run / "iter_0000003", root / "iter_0000003")
    (root / "latest_checkpointed_iteration.txt").write_text("3")
    return root


def _adam_bounds(steps: int, beta1: float = 0.9, beta2: float = 0.999) -> tuple[float, float]:
    """(C, A) for Adam after `steps` steps, whatever the gradients g_1..g_t were:
    |m_t| <= C sqrt(v_t) for the raw moments (m_t = (1-b1) sum b1^(t-k) g_k, v_t = (1-b2) sum b2^(t-k) g_k^2;
    Cauchy-Schwarz: C = (1-b1)/sqrt(1-b2) * sqrt(sum_j<t (b1^2/b2)^j)), and |m^_t / (sqrt(v^_t) + eps)| <= A
    for the bias-corrected step (A = C sqrt(1-b2^t) / (1-b1^t): 1.0, 1.0013, 1.0036 for t = 1, 2, 3)."""
    c = (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt(sum((beta1 * beta1 / beta2) ** j for j in range(steps)))
    return c, c * math.sqrt(1 - beta2 ** steps) / (1 - beta1 ** steps)


def test_checkpoints_hold_the_same_tensors_with_and_without_it(bf16_runs, tmp_path):
    """The two runs are the same training, but not the same arithmetic: the sharded run sums its gradient
    norm from reduce-scattered shards (another order of the float32 sums: the clip factor differs in the
    last bits) and updates pieces of each tensor with the elementwise kernels' vector and scalar paths
    at other offsets (FMA or not, by CPU). A last-bit difference can round a bf16 weight the other way,
    and then a token's expert (a discrete choice) can differ: an expert that receives no token in one run
    gets no update there and a full Adam step (about lr) in the other (seen: 5e-4 on an expert bias on an
    AMD EPYC). So no fixed tolerance is right on every x86-64 CPU. What holds on any CPU:
    - within each checkpoint, exactly: every bf16 weight is its float32 master rounded to bf16 (a cast,
      the same on every CPU), and Adam's moments obey |m| <= C sqrt(v) element by element (`_adam_bounds`:
      a moment block saved at another element's place breaks it);
    - across the runs: a float32 master moves by at most A x lr per step in either run, so after steps with
      learning rates lr_1..lr_t (as logged) the two differ by at most 2 A sum(lr_t), plus float32 rounding.
      Weights start at N(0, 0.02): a block saved at the wrong place is off by about its own size (~0.03)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    saved = {}
    for name in ("plain", "sharded"):
        dcp_to_torch_save(str(bf16_runs / name / "iter_0000003"), str(tmp_path / f"{name}.pt"))
        saved[name] = torch.load(tmp_path / f"{name}.pt", weights_only=False)
    assert saved["plain"].keys() == saved["sharded"].keys()
    optimizer_keys = [k for k in saved["plain"] if k.startswith("optimizer.")]
    assert any(k.startswith("optimizer.main_param.") for k in optimizer_keys)
    assert any(".experts." in k for k in optimizer_keys)
    lrs = [r["lr"] for r in metrics(bf16_runs / "plain" / "plots")[:3]]
    assert lrs == [r["lr"] for r in metrics(bf16_runs / "sharded" / "plots")[:3]]
    c, a = _adam_bounds(3)
    drift = 2 * sum(_adam_bounds(t)[1] * lr for t, lr in enumerate(lrs, 1))
    assert drift < 0.005  # (well below the weights' size: the check can fail)
    for name, state in saved.items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            assert value.shape == saved["plain"][key].shape and value.dtype == saved["plain"][key].dtype, key
            if key.startswith("optimizer.state.exp_avg."):
                v = state["optimizer.state.exp_avg_sq." + key[len("optimizer.state.exp_avg."):]]
                assert (v >= 0).all() and (value.abs() <= c * v.sqrt() * (1 + 1e-5)).all(), (name, key)
            elif not key.startswith("optimizer.") and value.dtype == torch.bfloat16:
                master = state["optimizer.main_param." + key]  # every bf16 weight has its float32 master
                assert master.dtype == torch.float32 and torch.equal(value, master.to(value.dtype)), (name, key)
    masters = [k for k in saved["plain"] if k.startswith("optimizer.main_param.")]
    masters += [k for k, v in saved["plain"].items()  # float32 weights (routers) are their own masters
                if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and not k.startswith("optimizer.")]
    assert any(".router." in k for k in masters)
    for key in masters:
        master, other = saved["plain"][key], saved["sharded"][key]
        bound = drift + 1e-6 * torch.maximum(master.abs(), other.abs())
        assert ((master - other).abs() <= bound).all(), (key, float((master - other).abs().max()), drift)


@pytest.mark.parametrize("saved_by,resumed_with,rel", [
    ("sharded", [SHARDED], 0.0), ("sharded", [], BF16_REL), ("plain", [SHARDED], BF16_REL)],
    ids=["sharded-bit-identical", "sharded-to-plain", "plain-to-sharded"])
def test_resume_continues_the_run(bf16_runs, tmp_path, saved_by, resumed_with, rel):
    """Resumed with the flag the checkpoint was saved with: bit-identical to the uninterrupted run.
    Across the flag: the uninterrupted run of the other kind, within the two kinds' difference."""
    resumed = run_train([*DP2, "--bf16", *resumed_with, "--train-iters", "6",
                         "--load", str(_at_iteration_3(bf16_runs / saved_by, tmp_path)),
                         "--plots-dir", str(tmp_path / "resumed")], tmp_path)
    assert "at iteration 3" in resumed.stdout
    straight = metrics(bf16_runs / ("sharded" if resumed_with else "plain") / "plots")
    _assert_same(straight[3:], metrics(tmp_path / "resumed"), rel=rel)


def test_sharded_checkpoints_convert_to_legacy_files_and_resume_from_them(bf16_runs, tmp_path):
    """`megatron-switch convert` reads a sharded run's blocks as whole tensors; the trainer puts each
    rank's pieces of the legacy files' tensors back into its sharded optimizer."""
    from megatron_switch.checkpoint.convert import convert

    legacy = tmp_path / "legacy"
    convert(str(_at_iteration_3(bf16_runs / "sharded", tmp_path)), str(legacy), fmt="torch", progress=False,
            log=lambda *a: None)
    resumed = run_train([*DP2, "--bf16", SHARDED, "--train-iters", "4", "--lr-decay-iters", "6", "--load", str(legacy),
                         "--plots-dir", str(tmp_path / "resumed")], tmp_path)
    assert "at iteration 3" in resumed.stdout
    _assert_same(metrics(bf16_runs / "sharded" / "plots")[3:4], metrics(tmp_path / "resumed"))


def test_sbatch_plans_a_train_job_with_it_only_when_the_job_has_it(capsys):
    from megatron_switch.planning.cli import sbatch_main
    from tests.test_planning import _run

    job = ["--preset", "switch-base-128-gpt", "--nodes", "4", "--save", "/ckpt"]
    plain = _run(sbatch_main, job)
    sharded = _run(sbatch_main, [*job, f"--extra-args={SHARDED}"])
    assert "optimizer state not sharded" in plain and SHARDED not in plain
    assert ", distributed optimizer" in sharded and f"\n    {SHARDED}\n" in sharded  # a line of the command
    cpu = _run(sbatch_main, ["--preset", "tiny", "--nodes", "1", "--cpu", "--save", "/ckpt", f"--extra-args={SHARDED}"])
    assert ", distributed optimizer" in cpu
    with pytest.raises(SystemExit) as exit_info:
        sbatch_main([*job, "--no-distributed-optimizer", f"--extra-args={SHARDED}"])
    assert exit_info.value.code == 2 and "contradicts" in capsys.readouterr().err
