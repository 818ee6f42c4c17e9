"""Planning: preset counts against the paper, the layout search's validity (property test), the
parameter model against models megatron-core builds, the CLI, and the committed Switch-C example."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_switch.parallel import validate_layout
from megatron_switch.planning.cli import plan_main, sbatch_main
from megatron_switch.planning.memory import GIB, TrainingSetup, estimate_memory
from megatron_switch.planning.model import ModelSpec, count_parameters, rank_parameters
from megatron_switch.planning.presets import get_preset, load_presets
from megatron_switch.planning.search import Cluster, NoLayoutFits, search_layouts
from tests.helpers import spawn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name,paper", [("switch-base-128", 7.4e9), ("switch-large-128", 26.3e9),
                                        ("switch-xxl-128", 395e9), ("switch-c-2048", 1571e9)])
def test_paper_parameter_counts(name, paper):
    preset = get_preset(name)
    assert preset.paper_parameters == paper
    total = count_parameters(preset.model).total
    assert abs(total / paper - 1) < 0.02, f"{name}: {total / 1e9:.2f}B vs the paper's {paper / 1e9}B"


def test_switch_large_accounting():
    """Table 9's GEGLU d_ff 2816 overshoots 26.3B by >2%; the trained ReLU d_ff 4096 model matches."""
    large = get_preset("switch-large-128").model
    geglu = dataclasses.replace(large, activation="geglu", ffn_hidden_size=2816)
    assert count_parameters(geglu).total / 26.3e9 - 1 > 0.03
    # Experts dominate: 24 Switch layers (12 per stack) x 128 experts x 2 x 1024 x 4096.
    assert count_parameters(large).experts == 24 * 128 * 2 * 1024 * 4096


def test_gpt_equivalents_hold_the_same_experts():
    for name in ("switch-base-128", "switch-large-128", "switch-c-2048"):
        t5, gpt = get_preset(name).model, get_preset(name + "-gpt").model
        assert t5.num_switch_layers == gpt.num_switch_layers
        assert count_parameters(gpt).experts == pytest.approx(count_parameters(t5).experts, rel=1e-3)


def test_every_preset_loads_and_plans():
    for name, preset in load_presets().items():
        counts = count_parameters(preset.model)
        assert 0 < counts.active < counts.total and counts.experts < counts.total, name


# -- the layout search never returns an invalid layout --------------------------------------------

@st.composite
def models(draw):
    heads = draw(st.sampled_from([1, 2, 4, 8, 12, 16, 32]))
    head_dim = draw(st.sampled_from([8, 16, 64]))
    encoder_decoder = draw(st.booleans())
    return ModelSpec(
        architecture="encoder-decoder" if encoder_decoder else "gpt",
        num_layers=draw(st.integers(1, 24)), decoder_num_layers=draw(st.integers(1, 12)) if encoder_decoder else None,
        hidden_size=heads * head_dim, num_attention_heads=heads,
        ffn_hidden_size=draw(st.sampled_from([64, 96, 256, 1024, 3072])),
        num_experts=draw(st.sampled_from([1, 2, 3, 8, 12, 64, 128, 2048])),
        expert_interval=draw(st.integers(1, 3)), activation=draw(st.sampled_from(["relu", "geglu"])),
        vocab_size=draw(st.integers(100, 50000)), seq_length=draw(st.sampled_from([64, 100, 512, 2048])),
        tie_embeddings=draw(st.booleans()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=models(), nodes=st.integers(1, 64), gpus_per_node=st.sampled_from([1, 2, 4, 6, 8]),
       memory_gib=st.sampled_from([1, 16, 40, 80, 141]), micro=st.sampled_from([1, 2, 4]),
       batches=st.integers(1, 512), distributed=st.booleans(), cpu=st.booleans())
def test_search_returns_only_valid_fitting_layouts(spec, nodes, gpus_per_node, memory_gib, micro, batches,
                                                   distributed, cpu):
    cluster = Cluster(nodes, gpus_per_node, memory_gib * GIB)
    setup = TrainingSetup(micro, micro * batches, "fp32" if cpu else "bf16", distributed, sequence_parallel=not cpu)
    try:
        layouts = search_layouts(spec, cluster, setup, top=4, allow_tied_pipeline=not cpu)
    except NoLayoutFits as err:
        assert "GPUs would fit" in str(err) or "no cluster" in str(err) or "no valid layout" in str(err)
        return
    assert layouts and all(c.fits for c in layouts)
    for c in layouts:
        validate_layout(cluster.world_size, c.tp, c.pp, c.ep, spec.num_experts)
        assert c.world_size == cluster.world_size and gpus_per_node % c.tp == 0
        assert spec.num_attention_heads % c.tp == 0 and spec.ffn_hidden_size % c.tp == 0
        assert spec.num_experts % c.ep == 0 and (spec.num_layers % c.pp == 0)
        assert not spec.encoder_decoder or c.pp == 1
        assert setup.global_batch_size % (micro * c.dp) == 0
        assert c.memory.total <= cluster.usable_memory
    assert [c.sort_key() for c in layouts] == sorted(c.sort_key() for c in layouts)


def test_nothing_fits_names_a_cluster_that_does():
    spec = get_preset("switch-xxl-128").model
    setup = TrainingSetup(1, 1024)
    with pytest.raises(NoLayoutFits, match="GPUs would fit") as err:
        search_layouts(spec, Cluster(2, 8, 80 * GIB), setup)
    nodes = int(str(err.value).split("--nodes ")[1].split()[0])
    best = search_layouts(spec, Cluster(nodes, 8, 80 * GIB), setup)[0]
    assert best.fits and best.world_size == 8 * nodes
    with pytest.raises(NoLayoutFits):  # and it is the smallest: one node less does not fit
        search_layouts(spec, Cluster(nodes - 1, 8, 80 * GIB), setup)


def test_distributed_optimizer_shards_dense_over_dp_and_experts_over_expert_dp():
    spec = get_preset("switch-base-128-gpt").model
    dist = estimate_memory(spec, TrainingSetup(1, 64), tp=1, pp=1, ep=4, dp=16)
    held = rank_parameters(spec, 1, 1, 4)
    dense, routers = held.dense - held.routers, held.routers
    assert dist.optimizer_replicated == 12 * dense + 8 * routers + 12 * held.experts
    assert dist.optimizer_distributed == pytest.approx((12 * dense + 8 * routers) / 16 + 12 * held.experts / 4)
    assert dist.weights == 2 * (held.total - routers) + 4 * routers and dist.gradients == 4 * held.total


# -- the parameter model matches what megatron-core builds ------------------------------------------

def _spec(gated_dense=False, tie=True, norm="LayerNorm", activation="relu", vocab=250):
    return ModelSpec(architecture="gpt", num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                     num_experts=4, expert_interval=2, activation=activation, dense_gated=gated_dense,
                     vocab_size=vocab, seq_length=16, tie_embeddings=tie, normalization=norm)


def _built_counts(spec: ModelSpec, tp: int, pp: int, ep: int):
    """(dense, experts, routers) parameters of this rank's model as megatron-core builds it."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_switch import SwitchConfig, get_switch_gpt_layer_spec
    from megatron_switch.parallel import initialize_parallel
    from tests.helpers import tiny_config

    initialize_parallel(tp, pp, ep, spec.num_experts, backend="gloo")
    try:
        config = tiny_config(hidden=spec.hidden_size, ffn=spec.ffn_hidden_size, layers=spec.num_layers,
                             heads=spec.num_attention_heads, tensor_model_parallel_size=tp,
                             pipeline_model_parallel_size=pp, gated_linear_unit=spec.dense_gated,
                             normalization=spec.normalization, pipeline_dtype=torch.float32)
        switch = SwitchConfig(num_experts=spec.num_experts, expert_interval=spec.expert_interval,
                              activation=spec.activation)
        model = GPTModel(config=config, transformer_layer_spec=get_switch_gpt_layer_spec(config, switch),
                         vocab_size=spec.padded_vocab(tp), max_sequence_length=spec.positions,
                         pre_process=parallel_state.is_pipeline_first_stage(),
                         post_process=parallel_state.is_pipeline_last_stage(),
                         share_embeddings_and_output_weights=spec.tie_embeddings)
        params = list(model.parameters())
        experts = sum(p.numel() for p in params if getattr(p, "allreduce", True) is False)
        routers = sum(p.numel() for n, p in model.named_parameters() if n.endswith("router.weight"))
        stage = parallel_state.get_pipeline_model_parallel_rank()
        return sum(p.numel() for p in params) - experts, experts, routers, stage
    finally:
        parallel_state.destroy_model_parallel()


def _check_layouts(rank, world_size, cases):
    for spec, (tp, pp, ep) in cases:
        dense, experts, routers, pp_rank = _built_counts(spec, tp, pp, ep)
        planned = rank_parameters(spec, tp, pp, ep, pp_rank)
        assert (dense, experts, routers) == (planned.dense, planned.experts, planned.routers), (
            f"rank {rank} TP={tp} PP={pp} EP={ep} stage {pp_rank}: built {dense, experts, routers}, "
            f"planned {planned}")


def test_rank_parameters_match_megatron_core_layouts():
    """Four ranks build the model at TP=2 x EP=2, PP=2 x EP=2, EP=4 and TP=4; each rank's dense,
    expert and router parameters equal the planner's for its pipeline stage."""
    untied = _spec(tie=False, activation="geglu")
    cases = [(untied, (2, 1, 2)), (untied, (1, 2, 2)), (_spec(), (1, 1, 4)), (_spec(gated_dense=True), (4, 1, 1))]
    spawn(_check_layouts, 4, cases)


@pytest.mark.parametrize("variant", [{}, {"gated_dense": True}, {"tie": False}, {"norm": "RMSNorm"},
                                     {"activation": "swiglu", "vocab": 258}])
def test_whole_model_count_matches_megatron_core(single_process_groups, variant):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # _built_counts creates the groups it needs
    spec = _spec(**variant)
    dense, experts, routers, _ = _built_counts(spec, 1, 1, 1)
    counts = count_parameters(spec)
    assert (dense + experts, experts) == (counts.total, counts.experts)
    assert routers == spec.num_switch_layers * spec.num_experts * spec.hidden_size


# -- command line ---------------------------------------------------------------------------------

def _run(main, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)
    return out.getvalue()


def test_plan_json_and_table():
    report = json.loads(_run(plan_main, ["--preset", "switch-base-128", "--nodes", "1", "--json"]))
    assert report["parameters"]["total"] == count_parameters(get_preset("switch-base-128").model).total
    best = report["layouts"][0]
    assert (best["tp"], best["pp"], best["ep"], best["dp"]) == (1, 1, 8, 8) and best["fits"]
    assert set(best["memory_bytes"]) >= {"weights", "gradients", "optimizer", "activations", "total",
                                         "optimizer_with_distributed_optimizer",
                                         "optimizer_without_distributed_optimizer"}
    table = _run(plan_main, ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
                             "--num-experts", "8", "--moe-layer-freq", "2", "--nodes", "1", "--cpu"])
    assert "decoder-only GPT, 4 layers" in table and "EP=2: expert all-to-all inside a node" in table


def test_plan_errors_say_what_to_change(capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_main(["--preset", "switch-c-2048", "--nodes", "2"])
    assert exit_info.value.code == 2
    assert "GPUs would fit it (--nodes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan_main(["--preset", "no-such-model", "--nodes", "1"])
    err = capsys.readouterr().err
    assert "choose one of" in err and "switch-c-2048" in err


def test_sbatch_encoder_decoder_presets_train_t5_with_our_trainer():
    """Without --megatron-lm, an encoder-decoder preset runs `megatron-switch train --model t5`, whose
    parser takes every flag of the command."""
    import shlex

    from megatron_switch.training.arguments import build_parser
    from megatron_switch.training.t5_arguments import check_model_flags

    script = _run(sbatch_main, ["--preset", "switch-base-128", "--nodes", "1", "--save", "ckpt"])
    block = script[script.index("TRAIN=(\n"):]
    words = shlex.split(block[:block.index("${LOAD")].split("megatron_switch.cli train", 1)[1])
    args = build_parser().parse_args(words)

    def fail(message):
        raise AssertionError(message)

    check_model_flags(args, fail)
    assert (args.model, args.encoder_num_layers, args.decoder_num_layers, args.kv_channels) == ("t5", 12, 12, 64)
    assert (args.encoder_seq_length, args.decoder_seq_length, args.feed_forward_proj) == (512, 114, "relu")
    assert args.moe_switch and args.num_experts == 128 and args.moe_layer_freq == 2


def test_sbatch_megatron_lm_command():
    script = _run(sbatch_main, ["--preset", "switch-xxl-128-gpt", "--nodes", "32", "--save", "/ckpt",
                                "--megatron-lm", "/opt/Megatron-LM", "--container-image", "img.sqsh",
                                "--container-mounts", "/data:/data", "--partition", "gpu", "--account", "proj"])
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "--container-image=img.sqsh",
                 "--container-mounts=/data:/data", "-m megatron_switch.megatron_lm.pretrain_gpt",
                 "--use-distributed-optimizer", "--switch-expert-activation geglu", "--exit-signal-handler",
                 "export PYTHONPATH=/opt/Megatron-LM", "scontrol show hostnames", "--moe-layer-freq '([0]*1+[1])*24'"):
        assert line in script, line
    assert subprocess.run(["bash", "-n"], check=False, input=script, text=True).returncode == 0
    unsharded = _run(sbatch_main, ["--preset", "switch-base-128-gpt", "--nodes", "4", "--save", "/ckpt",
                                   "--megatron-lm", "/opt/Megatron-LM", "--no-distributed-optimizer"])
    assert "--use-distributed-optimizer" not in unsharded  # planned without it, so launched without it


def _without_slurm_environment() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}


def test_sbatch_megatron_lm_dry_run_prints_each_node(tmp_path):
    """The multi-node preamble of the Megatron-LM script, run with --dry-run outside SLURM: the srun
    command once, then per node each task's ranks (block placement) and its node's own TMPDIR."""
    script = _run(sbatch_main, ["--preset", "switch-base-128-gpt", "--nodes", "3", "--gpus-per-node", "4",
                                "--save", str(tmp_path / "ckpt"), "--megatron-lm", "/opt/Megatron-LM"])
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    scratch = tmp_path / "scratch"
    env = dict(_without_slurm_environment(), TMPDIR=str(scratch))
    done = subprocess.run(["bash", str(path), "--dry-run"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "dry run: 3 node(s) x 4 task(s), rendezvous node0:20000, resume: no checkpoint yet"
    srun = lines[2]
    for word in ("srun --kill-on-bad-exit=1 --ntasks-per-node=4 bash -c", "megatron_switch.megatron_lm.pretrain_gpt",
                 "--expert-model-parallel-size", f"--save {tmp_path / 'ckpt'}", "--exit-signal SIGUSR1"):
        assert word in srun, word
    for node in range(3):
        at = lines.index(f"node {node} (node{node}):")
        for local in range(4):
            assert lines[at + 1 + local] == (
                f"  RANK={4 * node + local} WORLD_SIZE=12 LOCAL_RANK={local} NODE_RANK={node} MASTER_ADDR=node0 "
                f"MASTER_PORT=20000 TMPDIR={scratch}/megatron-switch-0-node{node}")
    assert not os.path.exists(tmp_path / "ckpt") and not os.path.exists(scratch)  # a dry run makes nothing
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("100")
    resumed = subprocess.run(["bash", str(path), "--dry-run"], capture_output=True, text=True, env=env, check=True)
    assert f"resume: --load {tmp_path / 'ckpt'}" in resumed.stdout.splitlines()[0]
    assert f"--load {tmp_path / 'ckpt'}" in resumed.stdout.splitlines()[2]


def test_sbatch_signal_must_come_before_the_time_limit(capsys):
    from megatron_switch.planning.sbatch import SbatchError, slurm_time_seconds

    assert [slurm_time_seconds(t) for t in ("30", "30:15", "04:00:00", "1-2", "1-2:30", "1-02:03:04")] == [
        1800, 1815, 14400, 93600, 95400, 93784]
    assert slurm_time_seconds("UNLIMITED") is None
    with pytest.raises(SbatchError, match="--time"):
        slurm_time_seconds("4h")
    base = ["--preset", "tiny", "--cpu", "--nodes", "1", "--save", "ckpt"]
    with pytest.raises(SystemExit):
        sbatch_main([*base, "--time", "00:01:00"])  # --cpu signals 60 s before the limit: never inside it
    assert "--signal-seconds 60 is not inside --time 00:01:00 (60 s)" in capsys.readouterr().err
    assert "#SBATCH --signal=B:USR1@60" in _run(sbatch_main, [*base, "--time", "00:05:00"])
    with pytest.raises(SystemExit):
        sbatch_main([*base, "--train-iters", "10", "--lr-warmup-iters", "10"])
    assert "--lr-warmup-iters 10 must be fewer than --train-iters 10" in capsys.readouterr().err


# -- the committed Switch-C example is what the generator writes today --------------------------------

def test_switch_c_example_is_current():
    script = (EXAMPLES / "switch_c_2048.sbatch").read_text()
    command = next(line for line in script.splitlines() if line.startswith("# Generated by: megatron-switch sbatch "))
    argv = shlex.split(command.removeprefix("# Generated by: megatron-switch sbatch "))
    assert _run(sbatch_main, argv) == script, "regenerate examples/switch_c_2048.sbatch with the command in its header"
    plan = (EXAMPLES / "switch_c_2048.plan.txt").read_text()
    first, rest = plan.split("\n", 1)
    assert first.startswith("$ megatron-switch plan ")
    assert _run(plan_main, shlex.split(first.removeprefix("$ megatron-switch plan "))) == rest, (
        "regenerate examples/switch_c_2048.plan.txt with the command on its first line")


# -- fitting a CPU job to the cluster sinfo describes ------------------------------------------------

SINFO = """n1 2 idle debug*
n2 2 mix debug*
n3 1 down* debug*
big1 8 idle big
big2 8 drain big
"""


def test_sinfo_partitions_count_only_usable_nodes():
    from megatron_switch.planning.slurm import Partition, parse_sinfo

    debug = parse_sinfo(SINFO, None)  # the default partition; n3 is down
    assert debug == Partition("debug", (2, 2)) and (debug.nodes, debug.cpus_per_node) == (2, 2)
    assert parse_sinfo(SINFO, "big") == Partition("big", (8,))
    assert parse_sinfo(SINFO, "gpu") is None
    assert parse_sinfo("", None) is None
    mixed = parse_sinfo("a 4 idle p*\nb 16 mix p*\nc 8 alloc p*\n", None)
    assert mixed.node_cpus == (16, 8, 4) and [mixed.cpus_on(n) for n in (1, 2, 3)] == [16, 8, 4]


def test_cpu_job_fits_the_partition_or_names_the_fix():
    from megatron_switch.planning.slurm import ClusterMismatch, Partition, fit_cpu_job

    small, big = Partition("debug", (2, 2)), Partition("big", (8,))
    assert (fit_cpu_job(big, 1, None, None).tasks_per_node, fit_cpu_job(big, 1, None, None).cpus_per_task) == (2, 4)
    one_cpu = fit_cpu_job(Partition("tiny", (1, 1, 1, 1)), 2, None, None)
    assert (one_cpu.tasks_per_node, one_cpu.cpus_per_task, one_cpu.overcommit) == (1, 1, False)
    with pytest.raises(ClusterMismatch, match=r"1 CPU\(s\) each; this job asks 2 .* --gpus-per-node 1 .*--overcommit"):
        fit_cpu_job(Partition("tiny", (1, 1, 1, 1)), 1, 2, None)
    assert fit_cpu_job(Partition("tiny", (1, 1, 1, 1)), 1, 2, None, overcommit=True).overcommit
    with pytest.raises(ClusterMismatch, match="has 2 usable node.*--nodes 2 or fewer"):
        fit_cpu_job(small, 3, None, None)
    with pytest.raises(ClusterMismatch, match="--cpus-per-task"):
        fit_cpu_job(small, 1, 2, 2)
    with pytest.raises(ClusterMismatch, match="no node that can run jobs"):
        fit_cpu_job(Partition("debug", ()), 1, None, None)
    # several nodes: 4 processes on one 2-CPU node do not fit; the same 4 on both nodes do
    with pytest.raises(ClusterMismatch, match="--nodes 2 --gpus-per-node 2 keeps the 4 processes"):
        fit_cpu_job(small, 1, 4, None)
    both = fit_cpu_job(small, 2, None, None)
    assert (both.tasks_per_node, both.cpus_per_task) == (2, 1) and "on 2 node(s)" in both.note
    # nodes of different sizes: a one-node job counts on the biggest, a two-node job on the second
    mixed = Partition("p", (16, 8, 4))
    assert fit_cpu_job(mixed, 1, None, None).cpus_per_task == 8
    assert fit_cpu_job(mixed, 2, None, None).cpus_per_task == 4
    with pytest.raises(ClusterMismatch, match="2 node.s. with the most CPUs have 8 CPU"):
        fit_cpu_job(mixed, 2, 2, 8)
    unchecked = fit_cpu_job(None, 1, None, None)
    assert (unchecked.tasks_per_node, unchecked.cpus_per_task) == (2, 1) and "not checked" in unchecked.note


def test_encoder_decoder_presets_count_the_t5_the_trainer_builds(single_process_groups, tmp_path, monkeypatch):
    """An encoder-decoder preset (shrunk to a tiny width, its structure kept: layer counts, Switch
    placement, tied embeddings, FFN kind) planned by the planner and built by `megatron-switch train
    --model t5` from the command its sbatch script runs: the same parameters, total and in experts."""
    from megatron.core import parallel_state

    from megatron_switch.compat import enable_cpu_support
    from megatron_switch.parallel import initialize_parallel
    from megatron_switch.training.arguments import parse_args
    from megatron_switch.training.model import build_model

    shrink = {"num_layers": 4, "decoder_num_layers": 4, "hidden_size": 32, "num_attention_heads": 2,
              "kv_channels": 16, "ffn_hidden_size": 64, "num_experts": 4, "vocab_size": 512, "seq_length": 64,
              "decoder_seq_length": 16}
    monkeypatch.chdir(tmp_path)
    parallel_state.destroy_model_parallel()
    for preset in ("switch-base-128", "switch-c-2048"):
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in shrink.items()]
        script = _run(sbatch_main, ["--preset", preset, *flags, "--nodes", "1", "--cpu", "--save", "ckpt"])
        block = script[script.index("TRAIN=(\n"):]
        words = shlex.split(block[:block.index("${LOAD")].split("megatron_switch.cli train", 1)[1])
        args = parse_args([*words, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
                           "--expert-model-parallel-size", "1"])
        initialize_parallel(1, 1, 1, args.num_experts, backend="gloo")
        enable_cpu_support()
        try:
            model = build_model(args, shrink["vocab_size"])
            params = list(model.parameters())
            experts = sum(p.numel() for p in params if getattr(p, "allreduce", True) is False)
            planned = count_parameters(dataclasses.replace(get_preset(preset).model, **shrink))
            assert (sum(p.numel() for p in params), experts) == (planned.total, planned.experts), preset
        finally:
            parallel_state.destroy_model_parallel()
