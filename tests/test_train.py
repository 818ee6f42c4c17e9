"""`megatron-switch train` end to end on CPU: learning, layouts, resume, signals, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch


SMALL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
         "--micro-batch-size", "2", "--moe-switch", "--num-experts", "4", "--moe-layer-freq", "2",
         "--untie-embeddings-and-output-weights", "--log-interval", "1"]
EXACT = ["--moe-input-jitter-eps", "0"]  # jitter draws from each rank's RNG stream


def run_train(args, cwd, check=True):
    env = dict(os.environ, MEGATRON_SWITCH_CACHE=os.path.join(str(cwd), "cache"))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "megatron_switch.train", *args],
                          capture_output=True, text=True, cwd=cwd, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def metrics(plots_dir):
    with open(os.path.join(plots_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_ep2_run_learns_and_reports(tmp_path):
    run_train(["--nproc-per-node", "2", "--expert-model-parallel-size", "2", *SMALL, "--global-batch-size", "8",
               "--train-iters", "30", "--lr", "3e-3", "--save", str(tmp_path / "ckpt"),
               "--eval-interval", "15", "--eval-iters", "2", "--tensorboard-dir", str(tmp_path / "tb")], tmp_path)
    m = metrics(tmp_path / "ckpt" / "plots")
    assert len(m) == 30
    assert m[-1]["lm_loss"] < m[0]["lm_loss"] - 1.0
    assert all(0 < r["aux_loss"] < 1 and 0 <= r["dropped_fraction"] < 1 and r["tokens_per_s"] > 0 for r in m)
    assert "valid_lm_loss" in m[14] and "valid_lm_loss" in m[29]
    for png in ("loss.png", "expert_load.png"):
        assert os.path.getsize(tmp_path / "ckpt" / "plots" / png) > 1000
    with open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == "30"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("lm_loss")] == list(range(1, 31))
    assert {"aux_loss", "dropped_fraction", "lr", "tokens_per_s"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize("layout, tied", [
    (["--nproc-per-node", "4", "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"], False),
    (["--nproc-per-node", "4", "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
      "--overlap-grad-reduce", "--use-distributed-optimizer", "--make-vocab-size-divisible-by", "256"], True),
    (["--nproc-per-node", "4", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
      "--expert-model-parallel-size", "2", "--sequence-parallel"], True),
], ids=["tp2xep2", "pp2xdp2xep2-overlap-zero1-tied", "tp2xpp2xep2-sp-tied"])
def test_layouts_match_one_process(tmp_path, layout, tied):
    """Same losses, routing and gradient norms as one process (gradients through megatron-core's DDP;
    in pp2xdp2xep2-overlap-zero1-tied, with data parallelism beside the pipeline, reduce-scattered
    bucket by bucket during backward for the distributed optimizer); with tied embeddings across pipeline
    stages, the last stage's copy starts equal to the first stage's and gets the same updates; with
    sequence parallelism, norm gradients (partial per sequence shard) are summed over TP."""
    shape = [flag for flag in SMALL if flag != "--untie-embeddings-and-output-weights"] if tied else SMALL
    common = [*shape, *EXACT, "--global-batch-size", "8", "--train-iters", "4", "--eval-interval", "2",
              "--eval-iters", "2"]
    # Megatron pads the vocabulary to a multiple of 128 x TP; 256 keeps one process at TP=2's size.
    run_train(["--nproc-per-node", "1", *common, "--make-vocab-size-divisible-by", "256",
               "--plots-dir", str(tmp_path / "one")], tmp_path)
    run_train([*layout, *common, "--plots-dir", str(tmp_path / "many")], tmp_path)
    ones, manys = metrics(tmp_path / "one"), metrics(tmp_path / "many")
    assert [r["iteration"] for r in manys] == [r["iteration"] for r in ones] == [1, 2, 3, 4]
    for one, many in zip(ones, manys):
        assert one.keys() == many.keys()  # an evaluation in one run and not the other is a difference
        for key in ("lm_loss", "aux_loss", "dropped_fraction", "grad_norm", "valid_lm_loss"):
            if key in one:
                assert many[key] == pytest.approx(one[key], rel=2e-5, abs=1e-6), (key, one, many)
    # The evaluation passes (forward only, at iterations 2 and 4) were compared too.
    assert ["valid_lm_loss" in r for r in ones] == [False, True, False, True]


def test_activation_recomputation_gives_the_same_run(tmp_path):
    """Full recomputation with dropout and router jitter: megatron's checkpointing restores the RNG
    states, so the recomputed forward routes and drops the same tokens."""
    common = ["--nproc-per-node", "2", "--expert-model-parallel-size", "2", *SMALL, "--global-batch-size", "8",
              "--train-iters", "3", "--hidden-dropout", "0.1"]
    run_train([*common, "--plots-dir", str(tmp_path / "stored")], tmp_path)
    run_train([*common, "--recompute-granularity", "full", "--recompute-method", "uniform",
               "--recompute-num-layers", "1", "--plots-dir", str(tmp_path / "recomputed")], tmp_path)
    stored, recomputed = metrics(tmp_path / "stored"), metrics(tmp_path / "recomputed")
    for a, b in zip(stored, recomputed):
        for key in ("lm_loss", "aux_loss", "dropped_fraction", "grad_norm"):
            assert a[key] == b[key], (key, a, b)


@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_resume_is_bit_identical(tmp_path, precision):
    common = ["--nproc-per-node", "2", "--expert-model-parallel-size", "2", *SMALL, "--global-batch-size", "4",
              "--lr-decay-iters", "6", "--lr-warmup-iters", "2", *precision]
    run_train([*common, "--train-iters", "6", "--plots-dir", str(tmp_path / "straight")], tmp_path)
    run_train([*common, "--train-iters", "3", "--save", str(tmp_path / "ckpt"),
               "--plots-dir", str(tmp_path / "first")], tmp_path)
    resumed = run_train([*common, "--train-iters", "6", "--load", str(tmp_path / "ckpt"),
                         "--plots-dir", str(tmp_path / "second")], tmp_path)
    assert "loaded checkpoint" in resumed.stdout and "at iteration 3" in resumed.stdout
    straight = metrics(tmp_path / "straight")
    assert [r["iteration"] for r in metrics(tmp_path / "second")] == [4, 5, 6]
    for a, b in zip(straight[3:], metrics(tmp_path / "second")):
        for key in ("lm_loss", "aux_loss", "z_loss", "dropped_fraction", "grad_norm", "lr"):
            assert a[key] == b[key], (key, a, b)


def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    env = dict(os.environ, MEGATRON_SWITCH_CACHE=str(tmp_path / "cache"))
    args = [sys.executable, "-m", "megatron_switch.train",
            "--nproc-per-node", "2", "--expert-model-parallel-size", "2", *SMALL, "--global-batch-size", "4",
            "--train-iters", "100000", "--save", str(tmp_path / "ckpt"), "--exit-signal-handler"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:  # wait for training to be under way, then signal every process
        seen.append(line)
        if line.startswith(" iteration") and sum(s.startswith(" iteration") for s in seen) == 3:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait() == 0, "".join(seen) + rest
    assert "exiting at iteration" in rest and "saved checkpoint" in rest
    with open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt") as f:
        saved = int(f.read())
    assert saved >= 3
    resumed = run_train(["--nproc-per-node", "2", "--expert-model-parallel-size", "2", *SMALL,
                         "--global-batch-size", "4", "--train-iters", str(saved + 1), "--lr-decay-iters", "100000",
                         "--load", str(tmp_path / "ckpt"), "--plots-dir", str(tmp_path / "p")], tmp_path)
    assert f"at iteration {saved}" in resumed.stdout


def test_missing_and_corrupt_checkpoints_fail_clearly_and_touch_nothing(tmp_path):
    proc = run_train([*SMALL, "--train-iters", "2", "--load", str(tmp_path / "nowhere")], tmp_path, check=False)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    ckpt = tmp_path / "ckpt"
    run_train([*SMALL, "--train-iters", "2", "--save", str(ckpt), "--plots-dir", str(tmp_path / "p")], tmp_path)
    shard = next(p for p in (ckpt / "iter_0000002").iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # truncate a data file
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    proc = run_train([*SMALL, "--train-iters", "4", "--lr-decay-iters", "2", "--load", str(ckpt), "--save", str(ckpt),
                      "--plots-dir", str(tmp_path / "p2")], tmp_path, check=False)
    assert proc.returncode != 0
    assert f"checkpoint {ckpt}/iter_0000002 is corrupt: {shard.name} is shorter than recorded" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before
    (ckpt / "latest_checkpointed_iteration.txt").write_text("garbage")
    proc = run_train([*SMALL, "--load", str(ckpt)], tmp_path, check=False)
    assert proc.returncode == 2 and "expected an iteration number" in proc.stderr


@pytest.mark.parametrize("flags,message", [
    (["--data-path", "/nonexistent/corpus"], "/nonexistent/corpus.bin"),
    (["--global-batch-size", "3"], "--global-batch-size 3 is not divisible"),
    (["--num-experts", "4"], "add --moe-switch"),
    (["--moe-switch", "--num-experts", "6", "--nproc-per-node", "4", "--expert-model-parallel-size", "4"],
     "not divisible by --expert-model-parallel-size 4"),
    (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--fp16"], "use --bf16"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--recompute-granularity", "full"], "needs --recompute-method uniform|block and --recompute-num-layers"),
    (["--recompute-method", "uniform"], "go with --recompute-granularity full"),
    (["--lr-warmup-iters", "1"], "--lr-warmup-iters 1 must be fewer than the decay iterations"),
])
def test_bad_flags_fail_before_any_process_starts(tmp_path, flags, message):
    proc = run_train(["--train-iters", "1", *flags], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def _data_on_two_nodes(rank, world_size, root):
    """Two ranks as the first processes of two nodes with a cache directory each (LOCAL_RANK 0 on both)."""
    from megatron_switch.data.corpus import corpus_prefix, default_corpus_on_every_node
    from megatron_switch.data.datasets import check_cache_shared
    from megatron_switch.data.preprocess import DataError
    from megatron_switch.data.tokenizers import build_tokenizer
    from megatron_switch.parallel import initialize_parallel

    initialize_parallel()
    os.environ.update(LOCAL_RANK="0", MEGATRON_SWITCH_CACHE=os.path.join(root, f"node{rank}"))
    prefix = default_corpus_on_every_node(build_tokenizer("ByteLevelTokenizer", None), "ByteLevelTokenizer")
    assert prefix == corpus_prefix("ByteLevelTokenizer") and os.path.isfile(prefix + ".idx")
    with pytest.raises(DataError, match=r"not one directory for every rank: rank 1 does not see.*--data-cache-path"):
        check_cache_shared(os.path.join(os.environ["MEGATRON_SWITCH_CACHE"], "index-cache"))
    shared = os.path.join(root, "shared-index-cache")
    check_cache_shared(shared)  # one directory for both: passes, and leaves nothing behind
    torch.distributed.barrier()
    assert os.listdir(shared) == []


def test_default_corpus_and_index_cache_across_nodes_with_their_own_disks(tmp_path):
    """Nodes that do not share MEGATRON_SWITCH_CACHE each get the default corpus (built by their first
    local rank); an index cache that is not one directory for all ranks fails on every rank with the
    fix, before megatron-core would miss its files; a shared one passes."""
    from tests.helpers import spawn

    spawn(_data_on_two_nodes, 2, str(tmp_path))
    corpus = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-ByteLevelTokenizer"
    for node in ("node0", "node1"):  # the corpus, complete (with the pair's fingerprint), and no temporary files
        assert sorted(set(os.listdir(tmp_path / node)) - {"index-cache"}) == [
            f"{corpus}.bin", f"{corpus}.fingerprint.json", f"{corpus}.idx"]


def test_bf16_resume_without_optimizer_state_keeps_the_loaded_weights(single_process_groups, tmp_path):
    """A checkpoint without optimizer state (convert --no-optim) loaded into a --bf16 run: the float32
    master weights start from the loaded model, so the first step updates the loaded weights (not the
    fresh initialisation the masters were copied from)."""
    from megatron_switch.checkpoint.convert import convert
    from megatron_switch.compat import enable_cpu_support
    from megatron_switch.training.arguments import parse_args
    from megatron_switch.training.checkpointing import load_checkpoint, save_checkpoint
    from megatron_switch.training.model import build_model
    from megatron_switch.training.optimizer import Optimization
    from megatron.core.transformer.module import Float16Module

    def setup(seed):
        args = parse_args(["--moe-switch", "--num-experts", "2", "--num-layers", "2", "--hidden-size", "32",
                           "--num-attention-heads", "2", "--seq-length", "16", "--bf16", "--seed", str(seed),
                           "--switch-expert-activation", "relu"])
        args = dataclasses.replace(args, switch=dataclasses.replace(args.switch, init_seed=seed))
        torch.manual_seed(seed)
        model = build_model(args, 258)
        model = Float16Module(model.config, model)
        optimization = Optimization(model, args, megatron_ddp=False)
        return model, optimization, optimization.scheduler

    enable_cpu_support()
    model, optimization, scheduler = setup(seed=1)
    save_checkpoint(str(tmp_path / "full"), 1, model, optimization.checkpointed, scheduler,
                    {"iteration": 1, "consumed_train_samples": 0})
    convert(str(tmp_path / "full"), str(tmp_path / "no-optim"), fmt="torch_dist", no_optim=True,
            progress=False, log=lambda *a: None)

    fresh, fresh_optimization, fresh_scheduler = setup(seed=2)  # other weights until the load
    load_checkpoint(str(tmp_path / "no-optim"), fresh, fresh_optimization.checkpointed, fresh_scheduler)
    separate = 0
    for master, param, saved in zip(fresh_optimization.masters, fresh_optimization.params, optimization.params):
        assert torch.equal(param, saved)
        assert torch.equal(master, param.float())
        separate += master is not param
    assert separate > 0  # the bf16 parameters do have float32 copies
