"""`megatron-switch train --model t5` end to end on CPU: Switch T5 on span corruption from the embedded
default corpus; expert, tensor and sequence parallelism (with megatron-core's DDP and the distributed
optimizer) equal one process; a torch_dist checkpoint resumes bit-identically; bad flag combinations
fail before any process starts."""

from __future__ import annotations

import os

import pytest

from megatron_switch.checkpoint.integrity import model_differences
from tests.test_train import metrics, run_train

T5 = ["--model", "t5", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "64",
      "--micro-batch-size", "2", "--moe-switch", "--num-experts", "4", "--moe-layer-freq", "2", "--log-interval", "1",
      "--moe-z-loss-coeff", "1e-3"]
EXACT = ["--moe-input-jitter-eps", "0"]  # jitter draws from each rank's RNG stream


def test_t5_trains_on_span_corruption_out_of_the_box(tmp_path):
    """No data flags: span corruption of the default corpus (byte-level tokenizer, 100 sentinels);
    metrics, evaluation, plots with a row per Switch layer of each stack, a checkpoint."""
    run_train(["--nproc-per-node", "2", "--expert-model-parallel-size", "2", *T5, "--global-batch-size", "8",
               "--train-iters", "16", "--lr", "1e-2", "--save", str(tmp_path / "ckpt"), "--eval-interval", "8",
               "--eval-iters", "2"], tmp_path)
    m = metrics(tmp_path / "ckpt" / "plots")
    assert [r["iteration"] for r in m] == list(range(1, 17))
    assert m[-1]["lm_loss"] < m[0]["lm_loss"] - 0.5
    assert all(0 < r["aux_loss"] < 1 and 0 < r["z_loss"] and 0 <= r["dropped_fraction"] < 1 for r in m)
    assert "valid_lm_loss" in m[7] and "valid_lm_loss" in m[15]
    for png in ("loss.png", "expert_load.png"):
        assert os.path.getsize(tmp_path / "ckpt" / "plots" / png) > 1000
    with open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == "16"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5-one")
    run_train(["--nproc-per-node", "1", *T5, *EXACT, *LAYOUT_COMMON, "--plots-dir", str(root / "one")], root)
    return metrics(root / "one")


# Megatron pads the vocabulary to a multiple of 128 x TP; 256 keeps one process at TP=2's size.
LAYOUT_COMMON = ["--global-batch-size", "8", "--train-iters", "3", "--eval-interval", "3", "--eval-iters", "1",
                 "--make-vocab-size-divisible-by", "256"]


@pytest.mark.parametrize("layout", [
    ["--nproc-per-node", "2", "--expert-model-parallel-size", "2", "--use-distributed-optimizer",
     "--overlap-grad-reduce"],
    ["--nproc-per-node", "4", "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
    ["--nproc-per-node", "4", "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
     "--sequence-parallel"],
], ids=["ep2xdp2-zero1", "tp2xep2", "tp2xep2-sp"])
def test_t5_layouts_match_one_process(tmp_path, one_process, layout):
    """Same losses (training and evaluation), router losses, dropped fractions and gradient norms as
    one process holding every expert."""
    run_train([*layout, *T5, *EXACT, *LAYOUT_COMMON, "--plots-dir", str(tmp_path / "many")], tmp_path)
    manys = metrics(tmp_path / "many")
    assert [r["iteration"] for r in manys] == [r["iteration"] for r in one_process] == [1, 2, 3]
    for one, many in zip(one_process, manys):
        assert one.keys() == many.keys()
        for key in ("lm_loss", "aux_loss", "z_loss", "dropped_fraction", "grad_norm", "valid_lm_loss"):
            if key in one:
                assert many[key] == pytest.approx(one[key], rel=2e-5, abs=1e-6), (key, one, many)
    assert "valid_lm_loss" in one_process[-1]


@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_t5_resume_is_bit_identical(tmp_path, precision):
    common = ["--nproc-per-node", "2", "--expert-model-parallel-size", "2", *T5, "--global-batch-size", "4",
              "--untie-embeddings-and-output-weights", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
              "--lr-decay-iters", "4", "--lr-warmup-iters", "1", *precision]
    run_train([*common, "--train-iters", "4", "--plots-dir", str(tmp_path / "straight")], tmp_path)
    run_train([*common, "--train-iters", "2", "--save", str(tmp_path / "ckpt"), "--plots-dir", str(tmp_path / "first")],
              tmp_path)
    resumed = run_train([*common, "--train-iters", "4", "--load", str(tmp_path / "ckpt"),
                         "--plots-dir", str(tmp_path / "second")], tmp_path)
    assert "at iteration 2" in resumed.stdout
    straight, second = metrics(tmp_path / "straight"), metrics(tmp_path / "second")
    assert [r["iteration"] for r in second] == [3, 4]
    for a, b in zip(straight[2:], second):
        for key in ("lm_loss", "aux_loss", "z_loss", "dropped_fraction", "grad_norm", "lr"):
            assert a[key] == b[key], (key, a, b)


def test_t5_checkpoint_converts_across_layouts_then_resumes(tmp_path, capsys):
    """Saved at EP=2, converted to TP=2 (torch_dist) and to TP=2 x EP=2 (Megatron-LM's legacy files),
    resumed there: the run continues as the unconverted one does, to float32 round-off."""
    from megatron_switch.checkpoint.convert import main as convert

    common = [*T5, *EXACT, "--global-batch-size", "4", "--lr-decay-iters", "4", "--make-vocab-size-divisible-by", "256"]
    ep2 = ["--nproc-per-node", "2", "--expert-model-parallel-size", "2"]
    run_train([*ep2, *common, "--train-iters", "4", "--plots-dir", str(tmp_path / "straight")], tmp_path)
    run_train([*ep2, *common, "--train-iters", "2", "--save", str(tmp_path / "ckpt"), "--plots-dir",
               str(tmp_path / "first")], tmp_path)
    targets = {"tp2": (["--target-tp", "2", "--target-ep", "1"],
                       ["--nproc-per-node", "2", "--tensor-model-parallel-size", "2"]),
               "tp2xep2-legacy": (["--target-tp", "2", "--format", "torch"],
                                  ["--nproc-per-node", "4", "--tensor-model-parallel-size", "2", *ep2[2:]])}
    straight = metrics(tmp_path / "straight")
    for name, (target, layout) in targets.items():
        convert(["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / name), "--no-progress-bar", *target])
        resumed = run_train([*layout, *common, "--train-iters", "4", "--load", str(tmp_path / name),
                             "--plots-dir", str(tmp_path / f"resumed-{name}")], tmp_path)
        assert "at iteration 2" in resumed.stdout
        second = metrics(tmp_path / f"resumed-{name}")
        assert [r["iteration"] for r in second] == [3, 4]
        for a, b in zip(straight[2:], second):
            for key in ("lm_loss", "aux_loss", "z_loss", "dropped_fraction", "grad_norm", "lr"):
                assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), (name, key, a, b)
    with pytest.raises(SystemExit):
        convert(["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "pp2"), "--target-pp", "2"])
    assert "megatron-core's T5 splits no stack over pipeline stages: use --target-pp 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "pp2")


@pytest.mark.parametrize("flags, message", [
    (["--model", "t5", "--pipeline-model-parallel-size", "2", "--nproc-per-node", "2"],
     "megatron-core's T5 splits no stack over pipeline stages"),
    (["--encoder-num-layers", "2"], "--encoder-num-layers describe an encoder-decoder: add --model t5"),
    (["--model", "t5", "--position-embedding-type", "rope"], "uses relative positions"),
    (["--position-embedding-type", "relative"], "uses learned_absolute positions"),
    (["--model", "t5", "--normalization", "LayerNorm"], "T5 normalizes with an RMS norm"),
    (["--model", "t5", "--vocab-extra-ids", "3"], "give --vocab-extra-ids 100"),
    (["--model", "t5", "--seq-length", "64", "--decoder-seq-length", "4"], "is shorter than the targets"),
    (["--model", "t5", "--dataloader-type", "dali"], "span corruption (--model t5) reads through"),
    (["--model", "t5", "--num-layers", "2", "--decoder-num-layers", "1", "--moe-switch", "--num-experts", "2",
      "--moe-layer-freq", "2"], "puts no Switch layer in the 1-layer decoder"),
    (["--model", "t5", "--moe-switch", "--num-experts", "2", "--switch-expert-activation", "swiglu"],
     "T5's experts compute its FFN (relu)"),
    (["--model", "t5", "--hidden-dropout", "0.1"], "T5 has one dropout rate"),
    (["--model", "t5", "--recompute-granularity", "selective"], "reuses T5's relative position bias"),
    (["--model", "t5", "--hidden-size", "30", "--num-attention-heads", "4"], "pass --kv-channels"),
], ids=["pp", "t5-flag-on-gpt", "t5-rope", "gpt-relative", "t5-layernorm", "few-sentinels", "short-decoder",
        "dali", "freq-past-decoder", "expert-activation", "two-dropouts", "recompute", "heads"])
def test_bad_t5_flags_fail_before_any_process_starts(tmp_path, flags, message):
    proc = run_train(["--train-iters", "1", *flags], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_checkpoint_of_the_other_model_is_named():
    gpt = {"num_layers": 2, "hidden_size": 32}
    t5 = {"model": "t5", "num_layers": 2, "hidden_size": 32, "encoder_num_layers": 2}
    assert model_differences(gpt, t5) == ["the checkpoint is a GPT model, this run builds T5: pass --model gpt"]
    assert model_differences(t5, gpt) == ["the checkpoint is a T5 model, this run builds GPT: pass --model t5"]
    assert model_differences(t5, dict(t5, encoder_num_layers=4)) == [
        "--encoder-num-layers is 2 in the checkpoint, 4 here"]
