"""`megatron-switch convert` on a checkpoint from a real training run (TP2, PP1, EP2; 4 gloo processes):
every layout gives the same logits, round trips through every format are bit-identical, the trainer
resumes from converted legacy files exactly, and damaged or impossible inputs fail clearly without
leaving anything behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megatron_switch.checkpoint.contents import ConvertError
from megatron_switch.checkpoint.convert import convert, open_checkpoint
from megatron_switch.parallel import LayoutError
from tests.helpers import spawn
from tests.test_train import EXACT, SMALL, metrics, run_train

TRAIN = [*SMALL, *EXACT, "--global-batch-size", "4", "--train-iters", "3", "--lr-warmup-iters", "1"]
SOURCE = (2, 1, 2)
# Megatron pads the vocabulary to a multiple of 128 x TP: 256 at TP=1 keeps TP=2's padded size.
LAYOUTS = {"tp1pp2ep2": (1, 2, 2), "ep4": (1, 1, 4), "ep1": (1, 1, 1)}


def _vocab_flags(tp: int):
    return ["--make-vocab-size-divisible-by", str(256 // tp)]


def _quiet(*args):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-iteration run at TP2 x EP2 saving iterations 2 and 3; every conversion of iteration 2."""
    root = tmp_path_factory.mktemp("convert")
    run_train(["--nproc-per-node", "4", "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
               *TRAIN, *_vocab_flags(2), "--save", str(root / "base"), "--save-interval", "2",
               "--plots-dir", str(root / "plots")], root)
    base = str(root / "base" / "iter_0000002")
    out = {"base": (base, SOURCE)}
    for label, (tp, pp, ep) in LAYOUTS.items():
        for fmt in ("torch", "torch_dist"):
            out[f"{fmt}-{label}"] = (str(root / f"{fmt}-{label}"), (tp, pp, ep))
            convert(base, out[f"{fmt}-{label}"][0], tp, pp, ep, fmt, progress=False, log=_quiet)
    # and back, from the legacy files of another layout
    out["back-torch"] = (str(root / "back-torch"), SOURCE)
    convert(out["torch-tp1pp2ep2"][0], out["back-torch"][0], *SOURCE, "torch", progress=False, log=_quiet)
    out["back-torch_dist"] = (str(root / "back-torch_dist"), SOURCE)
    convert(out["torch-ep4"][0], out["back-torch_dist"][0], *SOURCE, "torch_dist", progress=False, log=_quiet)
    safetensors = str(root / "safetensors")  # the trainer loads torch_dist and legacy files: convert back
    convert(base, safetensors, fmt="safetensors", progress=False, log=_quiet)
    out["from-safetensors"] = (str(root / "from-safetensors"), SOURCE)
    convert(safetensors, out["from-safetensors"][0], fmt="torch_dist", progress=False, log=_quiet)
    out["no-optim-ep1"] = (str(root / "no-optim-ep1"), (1, 1, 1))
    convert(safetensors, out["no-optim-ep1"][0], 1, 1, 1, "torch", no_optim=True, progress=False, log=_quiet)
    return root, out


def _logits_worker(rank, world_size, jobs, out_dir):
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_switch.checkpoint.sharding import holders
    from megatron_switch.parallel import Layout
    from megatron_switch.compat import enable_cpu_support
    from megatron_switch.data.tokenizers import build_tokenizer
    from megatron_switch.parallel import initialize_parallel
    from megatron_switch.training.arguments import parse_args
    from megatron_switch.training.checkpointing import (
        load_model_weights,
        model_metadata,
    )
    from megatron_switch.training.model import build_model

    vocab = build_tokenizer("ByteLevelTokenizer", None).vocab_size
    tokens = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(7))
    positions = torch.arange(64).expand(2, 64)
    for label, path, (tp, pp, ep) in jobs:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        initialize_parallel(tp, pp, ep, 4, backend="gloo")
        enable_cpu_support()
        # Padded to capacity, each expert's GEMMs have the same shapes whatever tokens it got (CPU GEMMs
        # round products of 1-3 rows differently from larger ones), so equal weights give equal logits.
        args = parse_args([*SMALL, *_vocab_flags(tp), "--tensor-model-parallel-size", str(tp),
                           "--pipeline-model-parallel-size", str(pp), "--expert-model-parallel-size", str(ep),
                           "--moe-pad-expert-input-to-capacity"])
        model = build_model(args, vocab)
        # The converter's placement rules are the model's own sharding.
        coord = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
                 parallel_state.get_expert_model_parallel_rank())
        for sharded in nested_values(model.sharded_state_dict(metadata=model_metadata())):
            if isinstance(sharded, ShardedTensor):
                index = holders(sharded.key, tuple(sharded.global_shape), Layout(tp, pp, ep), 4)[coord]
                assert tuple(a for a, _ in index) == tuple(sharded.global_offset), sharded.key
                assert tuple(b - a for a, b in index) == tuple(sharded.local_shape), sharded.key
        assert load_model_weights(path, model) == 2
        model.eval()
        with torch.no_grad():
            if not parallel_state.is_pipeline_first_stage():
                hidden = torch.empty(64, 2, args.hidden_size)
                dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
            output = model(tokens, positions, attention_mask=None)
            if not parallel_state.is_pipeline_last_stage():
                dist.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
                continue
            parts = [torch.empty_like(output) for _ in range(tp)]
            dist.all_gather(parts, output.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
            torch.save(torch.cat(parts, dim=-1), os.path.join(out_dir, f"{label}.pt"))


def test_every_layout_gives_the_same_logits(run, tmp_path):
    _, out = run
    spawn(_logits_worker, 4, [(label, path, layout) for label, (path, layout) in out.items()], str(tmp_path))
    logits = {label: torch.load(tmp_path / f"{label}.pt") for label in out}
    base = logits.pop("base")
    assert base.shape == (2, 64, 512) and torch.isfinite(base).all()
    # TP=2 sums each row-parallel product in two halves: other TP sizes agree to float32 round-off.
    for label, value in logits.items():
        torch.testing.assert_close(value, base, rtol=1e-5, atol=1e-5, msg=label)
    # Same TP: exactly equal, whatever the format, the pipeline split or the expert split.
    for label in ("back-torch", "back-torch_dist", "from-safetensors"):
        assert torch.equal(logits[label], base), label
    tp1 = [v for k, v in logits.items() if out[k][1][0] == 1]
    assert all(torch.equal(v, tp1[0]) for v in tp1)


def _tensors(path):
    reader = open_checkpoint(path)
    try:
        return reader, {name: reader.read(name) for name in reader.tensors}
    finally:
        reader.close()


def test_round_trips_are_bit_identical(run, tmp_path):
    _, out = run
    source, expected = _tensors(out["base"][0])
    assert any(n.startswith("optimizer.state.exp_avg.") for n in expected)
    assert any(".mlp.experts.linear_fc1.weight" in n for n in expected)
    chain = [("torch", (1, 2, 2)), ("safetensors", (1, 2, 2)), ("torch_dist", (1, 1, 4)), ("torch", (2, 1, 2)),
             ("torch_dist", (2, 1, 2))]
    current = out["base"][0]
    for step, (fmt, layout) in enumerate(chain):
        target = str(tmp_path / f"{step}-{fmt}")
        convert(current, target, *layout, fmt, progress=False, log=_quiet)
        reader, found = _tensors(target)
        assert found.keys() == expected.keys(), fmt
        for name, value in expected.items():
            assert found[name].dtype == value.dtype and torch.equal(found[name], value), (fmt, name)
        assert reader.common["iteration"] == 2 and reader.common["consumed_train_samples"] == 8
        assert reader.common["scheduler"] == source.common["scheduler"]
        assert reader.objects.keys() == source.objects.keys()
        current = target
    legacy = torch.load(os.path.join(out["torch-tp1pp2ep2"][0], "iter_0000002", "mp_rank_00_001_001",
                                     "model_optim_rng.pt"), weights_only=False)
    assert {"args", "checkpoint_version", "iteration", "model", "optimizer", "opt_param_scheduler"} <= set(legacy)
    assert legacy["args"].pipeline_model_parallel_size == 2 and legacy["args"].expert_model_parallel_size == 2
    # stage 1 numbers its layers from 0; EP rank 1 holds experts 2 and 3 of the global bank
    assert legacy["model"]["decoder.layers.1.mlp.experts.linear_fc1.weight"].shape[0] == 2
    assert torch.equal(legacy["model"]["decoder.layers.1.mlp.experts.linear_fc1.weight"],
                       expected["decoder.layers.3.mlp.experts.linear_fc1.weight"][2:])


def test_trainer_resumes_exactly_from_converted_legacy_files(run, tmp_path):
    root, out = run
    resumed = run_train(["--nproc-per-node", "4", "--tensor-model-parallel-size", "2",
                         "--expert-model-parallel-size", "2", *TRAIN, *_vocab_flags(2),
                         "--load", out["back-torch"][0], "--plots-dir", str(tmp_path / "plots")], tmp_path)
    assert "at iteration 2" in resumed.stdout
    straight, again = metrics(root / "plots")[2], metrics(tmp_path / "plots")[0]
    assert again["iteration"] == 3
    for key in ("lm_loss", "aux_loss", "grad_norm", "lr"):
        assert again[key] == straight[key], (key, straight, again)


def test_no_optim_drops_the_optimizer_state(run):
    _, out = run
    reader, tensors = _tensors(out["no-optim-ep1"][0])
    assert tensors and not reader.has_optimizer and "optimizer" not in reader.common
    state = torch.load(os.path.join(out["no-optim-ep1"][0], "iter_0000002", "mp_rank_00", "model_optim_rng.pt"),
                       weights_only=False)
    assert "optimizer" not in state


def _snapshot(path):
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(parent, name):
    return [p for p in os.listdir(parent) if p.startswith(name)]


def _as_written_by_megatron_lm(root):
    """Megatron-LM writes no integrity.json: drop ours so the checks that need no record are reached."""
    for record in root.rglob("integrity.json"):
        record.unlink()


def test_corrupt_files_fail_clearly_and_leave_no_target(run, tmp_path):
    _, out = run
    broken = tmp_path / "broken-dist"
    shutil.copytree(out["base"][0], broken)
    shard = max((p for p in broken.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ConvertError, match=f"is corrupt: {shard.name} is shorter than recorded: bytes .* are gone"):
        convert(str(broken), str(tmp_path / "target"), fmt="torch", progress=False, log=_quiet)
    assert _leftovers(tmp_path, "target") == []
    _as_written_by_megatron_lm(broken)
    with pytest.raises(ConvertError, match="truncated or corrupt"):
        convert(str(broken), str(tmp_path / "target"), fmt="torch", progress=False, log=_quiet)
    assert _leftovers(tmp_path, "target") == []

    legacy = tmp_path / "broken-legacy"
    shutil.copytree(out["torch-ep4"][0], legacy)
    file = legacy / "iter_0000002" / "mp_rank_00_002" / "model_optim_rng.pt"
    file.write_bytes(file.read_bytes()[:-200])
    with pytest.raises(ConvertError, match="is corrupt: mp_rank_00_002/model_optim_rng.pt"):
        convert(str(legacy), str(tmp_path / "target"), fmt="torch_dist", progress=False, log=_quiet)
    assert _leftovers(tmp_path, "target") == []
    _as_written_by_megatron_lm(legacy)
    with pytest.raises(ConvertError, match="mp_rank_00_002.*(truncated|corrupt)"):
        convert(str(legacy), str(tmp_path / "target"), fmt="torch_dist", progress=False, log=_quiet)
    assert _leftovers(tmp_path, "target") == []

    # Data changed after conversion (same shapes): the checksums catch it, and without them the manifest
    # written beside the converted checkpoint does.
    edited = tmp_path / "edited-legacy"
    shutil.copytree(out["torch-ep4"][0], edited)
    file = edited / "iter_0000002" / "mp_rank_00_000" / "model_optim_rng.pt"  # holds the copy that is read
    state = torch.load(file, weights_only=False)
    state["model"]["decoder.layers.1.mlp.router.weight"] += 1
    torch.save(state, file)
    with pytest.raises(ConvertError, match="mp_rank_00_000/model_optim_rng.pt bytes .*do not match"):
        convert(str(edited), str(tmp_path / "target"), progress=False, log=_quiet)
    _as_written_by_megatron_lm(edited)
    with pytest.raises(ConvertError, match="does not match the manifest.*different.*router.weight"):
        convert(str(edited), str(tmp_path / "target"), progress=False, log=_quiet)
    assert _leftovers(tmp_path, "target") == []


def test_missing_rank_and_mismatched_shape_fail_clearly(run, tmp_path):
    _, out = run
    legacy = tmp_path / "legacy"
    shutil.copytree(out["torch-tp1pp2ep2"][0], legacy)
    shutil.rmtree(legacy / "iter_0000002" / "mp_rank_00_001_000")
    with pytest.raises(ConvertError, match="is corrupt: mp_rank_00_001_000/model_optim_rng.pt is missing"):
        convert(str(legacy), str(tmp_path / "target"), progress=False, log=_quiet)
    _as_written_by_megatron_lm(legacy)
    with pytest.raises(ConvertError, match="missing rank file .*mp_rank_00_001_000/model_optim_rng.pt"):
        convert(str(legacy), str(tmp_path / "target"), progress=False, log=_quiet)
    shutil.copytree(os.path.join(out["torch-tp1pp2ep2"][0], "iter_0000002", "mp_rank_00_001_000"),
                    legacy / "iter_0000002" / "mp_rank_00_001_000")
    file = legacy / "iter_0000002" / "mp_rank_00_000_001" / "model_optim_rng.pt"
    state = torch.load(file, weights_only=False)
    key = "decoder.layers.1.mlp.experts.linear_fc2.weight"
    state["model"][key] = state["model"][key][:1].clone()
    torch.save(state, file)
    wrong_shape = f"mp_rank_00_000_001.*{key} has shape \\(1, 64, 256\\).*needs \\(2, 64, 256\\)"
    with pytest.raises(ConvertError, match=wrong_shape):
        convert(str(legacy), str(tmp_path / "target"), progress=False, log=_quiet)
    assert _leftovers(tmp_path, "target") == []


@pytest.mark.parametrize("layout,message", [
    ((1, 1, 3), "not divisible by --expert-model-parallel-size 3"),
    ((3, 1, 1), "4 attention heads are not divisible by --target-tp 3"),
    ((1, 3, 1), "4 layers do not split into 3 equal pipeline stages: use --target-pp 2"),
    ((1, 1, 8), "--num-experts 4 is not divisible by --expert-model-parallel-size 8"),
])
def test_impossible_target_layout_is_refused_before_writing(run, tmp_path, layout, message):
    _, out = run
    with pytest.raises(LayoutError, match=message):
        convert(out["base"][0], str(tmp_path / "target"), *layout, progress=False, log=_quiet)
    assert _leftovers(tmp_path, "target") == []


def test_existing_target_is_refused_and_untouched(run, tmp_path):
    _, out = run
    target = tmp_path / "target"
    shutil.copytree(out["torch-ep1"][0], target)
    before = _snapshot(target)
    with pytest.raises(ConvertError, match="already exists.*never overwrites"):
        convert(out["base"][0], str(target), 1, 1, 1, "torch", progress=False, log=_quiet)
    assert _snapshot(target) == before and _leftovers(tmp_path, "target") == ["target"]


def test_command_line(run, tmp_path):
    root, _ = run
    command = [sys.executable, "-m", "megatron_switch.cli", "convert"]
    done = subprocess.run([*command, "--load", str(root / "base"), "--save", str(tmp_path / "st"), "--format",
                           "safetensors", "--no-optim", "--no-progress-bar"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--no-optim: dropping" in done.stdout and "each checked against the source" in done.stdout
    assert sorted(os.listdir(tmp_path / "st")) == ["manifest.json", "model.safetensors", "model.safetensors.index.json"]
    failed = subprocess.run([*command, "--load", str(root / "base"), "--save", str(tmp_path / "x"),
                             "--target-ep", "3"], capture_output=True, text=True, check=False)
    assert failed.returncode == 1 and "error: target layout TP2 PP1 EP3" in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "x").exists()
    helped = subprocess.run([*command, "--help"], capture_output=True, text=True, check=False)
    assert "refused, never overwritten" in " ".join(helped.stdout.split())


def test_layout_check_names_the_tensor_that_does_not_split():
    from megatron_switch.checkpoint.sharding import check_layout
    from megatron_switch.parallel import Layout

    shapes = {"output_layer.weight": (384, 64), "decoder.layers.0.mlp.experts.linear_fc1.weight": (4, 256, 64)}
    with pytest.raises(LayoutError, match="output_layer.weight has 384 entries on axis 0, not divisible by "
                                          "--target-tp 256 .*make-vocab-size-divisible-by"):
        check_layout(Layout(256, 1, 1), shapes, {"num_layers": 2})
    check_layout(Layout(128, 1, 4), shapes, {"num_layers": 2})


def test_gated_dense_mlp_is_not_resplit_across_tensor_parallel_sizes(run, tmp_path):
    """Megatron-LM checkpoints trained with --swiglu shard [gate; up] per TP rank: a TP change is refused,
    the same TP converts."""
    _, out = run
    gated = tmp_path / "gated"
    shutil.copytree(out["torch-ep4"][0], gated)
    for file in gated.rglob("model_optim_rng.pt"):
        state = torch.load(file, weights_only=False)
        state["args"].swiglu = True
        torch.save(state, file)
    _as_written_by_megatron_lm(gated)  # edited as Megatron-LM would have written it
    with pytest.raises(ConvertError, match="gated dense MLPs.*keep --target-tp 1"):
        convert(str(gated), str(tmp_path / "tp2"), target_tp=2, fmt="torch_dist", progress=False, log=_quiet)
    assert _leftovers(tmp_path, "tp2") == []
    convert(str(gated), str(tmp_path / "same-tp"), target_ep=2, fmt="torch_dist", progress=False, log=_quiet)
