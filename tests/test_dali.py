"""The DALI loader backend (`--dataloader-type dali`) on CPU: the same samples and order as the torch
loader for the same seed, one shard per data-parallel rank, mid-epoch resume (from the sample count
and from DALI's pipeline checkpoint), and `megatron-switch train` with it. Skipped without DALI,
except the missing-DALI error itself."""

from __future__ import annotations

import importlib.util
import random
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import spawn

HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)")

MICRO, DP, GLOBAL, SEQ = 2, 2, 8, 16


def write_corpus(prefix: str) -> None:
    """A small indexed dataset: 60 documents of 5-80 words (byte-level tokens)."""
    from megatron_switch.data.preprocess import write_indexed_dataset
    from megatron_switch.data.tokenizers import ByteLevelTokenizer

    rng = random.Random(0)
    words = ["expert", "router", "token", "capacity", "switch", "layer", "gate", "shard", "seed", "batch"]
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 80))) for _ in range(60)]
    write_indexed_dataset(documents, prefix, ByteLevelTokenizer())


def train_dataset(prefix: str, seed: int, cache: str):
    from megatron_switch.data.datasets import build_gpt_datasets
    from megatron_switch.data.tokenizers import ByteLevelTokenizer

    return build_gpt_datasets([prefix], "1", SEQ, seed, (10 * GLOBAL, 0, 0), ByteLevelTokenizer(), cache)[0]


def assert_same_steps(got, expected) -> None:
    assert len(got) == len(expected)
    for step_got, step_expected in zip(got, expected):
        assert len(step_got) == len(step_expected) == GLOBAL // (MICRO * DP)
        for a, b in zip(step_got, step_expected):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _loader_worker(rank, world, prefix, cache):
    import torch.distributed as dist

    from megatron_switch.data.dali import DaliLoader
    from megatron_switch.parallel import initialize_parallel
    from megatron_switch.training.trainer import _micro_batches

    initialize_parallel(backend="gloo")
    args = SimpleNamespace(model="gpt", micro_batch_size=MICRO, global_batch_size=GLOBAL, data_parallel_size=DP)

    def dali(dataset, consumed=0, state=None):
        return DaliLoader(dataset, consumed, MICRO, GLOBAL, DP, rank, state=state)

    dataset = train_dataset(prefix, 1234, cache)
    steps = len(dataset) // GLOBAL
    assert steps >= 10
    torch_steps = [_micro_batches(dataset, s * GLOBAL, args) for s in range(steps)]
    dali_steps = list(dali(dataset))  # runs to the end of the dataset, an incomplete last step dropped
    assert_same_steps(dali_steps, torch_steps)

    # The ranks' shards partition each sampler group of MICRO x DP samples, rank-major, in dataset order.
    mine = torch.stack([mb["tokens"] for step in dali_steps for mb in step])  # [groups, MICRO, SEQ]
    shards = [None] * world
    dist.all_gather_object(shards, mine)
    interleaved = torch.stack(shards, dim=1).reshape(-1, SEQ)
    assert torch.equal(interleaved, torch.stack([dataset[i]["tokens"] for i in range(steps * GLOBAL)]))
    assert not torch.equal(shards[0], shards[1])

    # Resume mid-epoch at step k: from the sample count alone, and from DALI's pipeline checkpoint.
    k = 3
    assert_same_steps(list(dali(dataset, consumed=k * GLOBAL)), dali_steps[k:])
    first = dali(dataset)
    assert_same_steps([next(first) for _ in range(k)], dali_steps[:k])
    state = first.state_dict()
    assert isinstance(state["pipeline"], bytes) and state["consumed"] == k * GLOBAL
    restored = dali(dataset, consumed=k * GLOBAL, state=state)
    assert restored.pipeline.is_restored_from_checkpoint
    assert_same_steps(list(restored), dali_steps[k:])
    assert_same_steps(list(first), dali_steps[k:])
    with pytest.raises(ValueError, match=f"saved at sample {k * GLOBAL}, but the loader is asked to start at sample 0"):
        dali(dataset, consumed=0, state=state)

    # The order is the dataset's seeded shuffle: another seed, another order, still the torch loader's.
    reseeded = train_dataset(prefix, 4321, cache)
    reseeded_dali = [next(dali(reseeded))]
    assert_same_steps(reseeded_dali, [_micro_batches(reseeded, 0, args)])
    assert not torch.equal(reseeded_dali[0][0]["tokens"], dali_steps[0][0]["tokens"])


@needs_dali
def test_dali_pipeline_matches_torch_loader_per_rank_and_resumes(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_corpus(prefix)
    spawn(_loader_worker, DP, prefix, str(tmp_path / "index-cache"))


@needs_dali
def test_train_with_dali_gives_the_torch_loader_losses_and_resumes(tmp_path):
    from tests.test_train import SMALL, metrics, run_train

    common = ["--nproc-per-node", "2", "--expert-model-parallel-size", "2", *SMALL, "--global-batch-size", "8",
              "--lr-decay-iters", "4", "--eval-interval", "2", "--eval-iters", "1"]
    run_train([*common, "--train-iters", "4", "--plots-dir", str(tmp_path / "torch")], tmp_path)
    first = run_train([*common, "--dataloader-type", "dali", "--train-iters", "2", "--save", str(tmp_path / "ckpt"),
                       "--plots-dir", str(tmp_path / "dali1")], tmp_path)
    second = run_train([*common, "--dataloader-type", "dali", "--train-iters", "4", "--load", str(tmp_path / "ckpt"),
                        "--plots-dir", str(tmp_path / "dali2")], tmp_path)
    import nvidia.dali

    for proc, start in ((first, 0), (second, 16)):
        assert (f"data loader: DALI {nvidia.dali.__version__} pipeline, device_id=None (CPU), data-parallel "
                f"shard 0/2, from sample {start}") in proc.stdout
    reference = metrics(tmp_path / "torch")
    resumed = metrics(tmp_path / "dali1") + metrics(tmp_path / "dali2")
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(reference, resumed):
        for key in ("lm_loss", "aux_loss", "dropped_fraction", "grad_norm", "lr", "valid_lm_loss"):
            assert a.get(key) == b.get(key), (key, a, b)
    assert "valid_lm_loss" in resumed[1] and "valid_lm_loss" in resumed[3]


def test_missing_dali_fails_before_any_process_starts(monkeypatch, capsys):
    from megatron_switch.data.dali import DaliLoader, DaliUnavailableError
    from megatron_switch.training.arguments import parse_args

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # what `import nvidia.dali` meets when it is absent
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--train-iters", "1", "--dataloader-type", "dali"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--dataloader-type dali needs NVIDIA DALI" in err and "pip install nvidia-dali-cuda120" in err
    assert "megatron-switch[dali]" in err and "--dataloader-type single" in err
    with pytest.raises(DaliUnavailableError, match="pip install nvidia-dali-cuda120"):
        DaliLoader([], 0, MICRO, GLOBAL, DP, 0)
    assert parse_args(["--train-iters", "1"]).dataloader_type == "single"
