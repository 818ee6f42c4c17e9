"""Opening a checkpoint never runs code from it: a crafted pickle in each place one is read (a legacy
rank file, torch_dist's common state, `.metadata` and objects, a consolidated index of format 1, a
Transformer Engine extra state, a Hugging Face .bin) is refused with an error naming the global and
the file, and the code it names does not run (the sentinel file it would create does not appear);
`--trust-checkpoint-code` loads it (and runs it). Real checkpoints of every format, ours and
Megatron-LM-shaped, still load and convert bit-identically, and the allow-lists hold every global
their pickles name."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import pathlib
import pickle
import random
import shutil
import signal
import subprocess
import sys

import numpy
import pytest
import torch

from megatron_switch.checkpoint import safe_pickle
from megatron_switch.checkpoint.convert import convert, open_checkpoint
from megatron_switch.checkpoint.safe_pickle import CheckpointCodeError
from tests.test_train import SMALL, run_train

ITER = "iter_0000002"
RUN = [*SMALL, "--bf16", "--global-batch-size", "2", "--lr-decay-iters", "2", "--train-iters", "2"]  # TP1 PP1 EP1


def _quiet(*args):
    pass


class _Touch:
    """Unpickling this creates `path` (open(path, "w")): the stand-in for any code a crafted pickle runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _refused(err: Exception, file) -> None:
    message = str(err)
    assert "refused to unpickle io.open" in message, message
    assert str(file) in message and "--trust-checkpoint-code" in message, message


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A 2-iteration --bf16 run's torch_dist checkpoint (with its per-rank RNG object), converted to
    legacy files and to consolidated safetensors."""
    root = tmp_path_factory.mktemp("security")
    run_train([*RUN, "--save", str(root / "run"), "--save-interval", "2", "--plots-dir", str(root / "plots")], root)
    paths = {"torch_dist": root / "run", "torch": root / "legacy", "safetensors": root / "st"}
    for fmt in ("torch", "safetensors"):
        convert(str(paths["torch_dist"]), str(paths[fmt]), fmt=fmt, progress=False, log=_quiet)
    return paths


def _tensors(path, trusted=False) -> dict[str, torch.Tensor]:
    reader = open_checkpoint(str(path), trusted=trusted)
    try:
        return {name: reader.read(name) for name in reader.tensors}
    finally:
        reader.close()


def _rank_file(root) -> pathlib.Path:
    return pathlib.Path(root) / ITER / "mp_rank_00" / "model_optim_rng.pt"


def _copy_to_craft(source, target) -> None:
    """A copy of checkpoint `source` without its integrity.json: a crafted checkpoint brings none (or
    checksums of its own crafted bytes), so the pickle reader is what must refuse it."""
    shutil.copytree(source, target)
    for record in pathlib.Path(target).rglob("integrity.json"):
        record.unlink()


def _with_payload_in_args(source, target, payload) -> pathlib.Path:
    """A copy of the legacy checkpoint `source` whose rank file's args carry `payload`."""
    _copy_to_craft(source, target)
    file = _rank_file(target)
    state = torch.load(file, weights_only=False)  # our own file: trusted here
    state["args"].note = payload
    torch.save(state, file)
    return file


def _cli_convert(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "megatron_switch.cli", "convert", "--no-progress-bar", *map(str, args)]
    return subprocess.run(command,
                          capture_output=True, text=True, check=False)


def test_crafted_legacy_file_is_refused_by_convert_and_runs_nothing(ckpts, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    file = _with_payload_in_args(ckpts["torch"], tmp_path / "crafted", _Touch(sentinel))
    with pytest.raises(CheckpointCodeError) as err:
        convert(str(tmp_path / "crafted"), str(tmp_path / "out"), fmt="torch_dist", progress=False, log=_quiet)
    _refused(err.value, file)
    assert not sentinel.exists() and not (tmp_path / "out").exists()
    done = _cli_convert("--load", tmp_path / "crafted", "--save", tmp_path / "out")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "refused to unpickle io.open" in done.stderr, done.stderr
    assert not sentinel.exists()
    # Trusted, the same file converts (and its payload runs: that is what trusting means).
    done = _cli_convert("--load", tmp_path / "crafted", "--save", tmp_path / "out", "--trust-checkpoint-code")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sentinel.exists()


def test_crafted_legacy_file_is_refused_by_the_trainer_and_loads_when_trusted(ckpts, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    file = _with_payload_in_args(ckpts["torch"], tmp_path / "crafted", _Touch(sentinel))
    flags = [*RUN[:-1], "3", "--load", str(tmp_path / "crafted"), "--plots-dir", str(tmp_path / "plots")]
    proc = run_train(flags, tmp_path, check=False)
    assert proc.returncode != 0
    _refused(proc.stderr, file)
    assert not sentinel.exists()
    trusted = run_train([*flags, "--trust-checkpoint-code"], tmp_path)
    assert "loaded checkpoint" in trusted.stdout and "at iteration 2" in trusted.stdout
    assert sentinel.exists()


def test_crafted_torch_dist_common_state_and_metadata_are_refused(ckpts, tmp_path):
    from megatron_switch.checkpoint.distcp import read_common_state

    sentinel = tmp_path / "SENTINEL"
    common = tmp_path / "common"
    _copy_to_craft(ckpts["torch_dist"], common)
    # (megatron-core >= 0.19 keeps the common state inside the checkpoint, and reads a common.pt first)
    state = read_common_state(str(common / ITER), trusted=True)
    torch.save({**state, "note": _Touch(sentinel)}, common / ITER / "common.pt")
    with pytest.raises(CheckpointCodeError) as err:
        convert(str(common), str(tmp_path / "out"), fmt="torch", progress=False, log=_quiet)
    _refused(err.value, common / ITER / "common.pt")
    proc = run_train([*RUN[:-1], "3", "--load", str(common), "--plots-dir", str(tmp_path / "plots")], tmp_path,
                     check=False)
    assert proc.returncode != 0
    _refused(proc.stderr, common / ITER / "common.pt")

    metadata = tmp_path / "metadata"
    _copy_to_craft(ckpts["torch_dist"], metadata)
    with open(metadata / ITER / ".metadata", "rb") as f:
        plan = pickle.load(f)  # our own file: trusted here
    plan.note = _Touch(sentinel)
    with open(metadata / ITER / ".metadata", "wb") as f:
        pickle.dump(plan, f)
    with pytest.raises(CheckpointCodeError) as err:
        convert(str(metadata), str(tmp_path / "out"), fmt="torch", progress=False, log=_quiet)
    _refused(err.value, metadata / ITER / ".metadata")
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def _object_checkpoint(path, objects: dict) -> None:
    """A torch_dist checkpoint of one tensor and the ShardedObjects {key: value}, as megatron saves them."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(4.0))}
    state.update({key: ShardedObject(key, value, (1,), (0,), replica_id=0) for key, value in objects.items()})
    os.makedirs(path)
    dist_checkpointing.save(state, str(path))


def _object_template(keys) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    return {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4)),
            **{key: ShardedObject(key, None, (1,), (0,), replica_id=0) for key in keys}}


def test_crafted_sharded_objects_are_refused_and_real_ones_load(single_process_groups, tmp_path):
    """The trainer's torch_dist load reads megatron's ShardedObjects itself (torch's planner would
    unpickle them with weights_only=False): the per-rank RNG state, and Transformer Engine's extra
    state, a pickle in a byte tensor that TE before 2.18 unpickles unrestricted."""
    from megatron_switch.checkpoint.distcp import load_dist_checkpoint
    from megatron_switch.compat import apply_cpu_shims

    apply_cpu_shims()
    sentinel = tmp_path / "SENTINEL"
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy.random.get_state()}
    fp8_state = {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(4, 3),
                 "extra_fp8_variables": {"num_gemms": 1, "fp8_checkpoint": True}}  # TE's, without its recipe
    extra = "decoder.layers.0.mlp.linear_fc1._extra_state"
    _object_checkpoint(tmp_path / "real", {"rng_state": rng, extra: torch.frombuffer(
        bytearray(pickle.dumps(fp8_state)), dtype=torch.uint8)})
    loaded = load_dist_checkpoint(_object_template(["rng_state", extra]), str(tmp_path / "real"), trusted=False)
    assert torch.equal(loaded["w"], torch.arange(4.0))
    assert torch.equal(loaded["rng_state"]["torch"], rng["torch"]) and loaded["rng_state"]["python"] == rng["python"]
    assert all(numpy.array_equal(a, b) for a, b in zip(loaded["rng_state"]["numpy"], rng["numpy"]))
    assert torch.equal(pickle.loads(loaded[extra].numpy().tobytes())["amax_history_fwd"], torch.zeros(4, 3))

    _object_checkpoint(tmp_path / "rng", {"rng_state": {**rng, "note": _Touch(sentinel)}})
    with pytest.raises(CheckpointCodeError) as err:
        load_dist_checkpoint(_object_template(["rng_state"]), str(tmp_path / "rng"), trusted=False)
    _refused(err.value, tmp_path / "rng")
    assert "object rng_state/shard_0_1" in str(err.value)

    crafted_te = torch.frombuffer(bytearray(pickle.dumps({**fp8_state, "note": _Touch(sentinel)})), dtype=torch.uint8)
    _object_checkpoint(tmp_path / "te", {extra: crafted_te})
    with pytest.raises(CheckpointCodeError) as err:
        load_dist_checkpoint(_object_template([extra]), str(tmp_path / "te"), trusted=False)
    _refused(err.value, tmp_path / "te")
    assert not sentinel.exists()
    load_dist_checkpoint(_object_template([extra]), str(tmp_path / "te"), trusted=True)  # TE would unpickle it
    assert not sentinel.exists()


def _index(path) -> tuple[pathlib.Path, dict]:
    file = pathlib.Path(path) / "model.safetensors.index.json"
    return file, json.loads(file.read_text())


def _as_format_1(source, target, objects) -> pathlib.Path:
    """A copy of consolidated folder `source` as format 1 wrote it: objects as base64 torch.save pickles."""
    _copy_to_craft(source, target)
    file, index = _index(target)
    del index["metadata"]["version"]
    encoded = {}
    for key, value in objects.items():
        data = io.BytesIO()
        torch.save(value, data)
        encoded[key] = base64.b64encode(data.getvalue()).decode()
    index["metadata"]["objects"] = encoded
    file.write_text(json.dumps(index))
    return file


def test_consolidated_index_of_format_1_is_read_through_the_allow_list(ckpts, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    real = open_checkpoint(str(ckpts["safetensors"])).objects
    assert real and all(v is None for v in real.values())  # CPU layers keep no extra state
    _as_format_1(ckpts["safetensors"], tmp_path / "old", real)
    old = open_checkpoint(str(tmp_path / "old"))
    assert old.objects == real
    convert(str(tmp_path / "old"), str(tmp_path / "from-old"), fmt="torch", progress=False, log=_quiet)
    expected = _tensors(ckpts["torch_dist"])
    found = _tensors(tmp_path / "from-old")
    assert found.keys() == expected.keys() and all(torch.equal(found[n], expected[n]) for n in expected)

    index = _as_format_1(ckpts["safetensors"], tmp_path / "crafted", {**real, "x._extra_state": _Touch(sentinel)})
    with pytest.raises(CheckpointCodeError) as err:
        open_checkpoint(str(tmp_path / "crafted"))
    _refused(err.value, index)
    assert not sentinel.exists()


def test_consolidated_objects_are_json_and_tensors(ckpts, tmp_path):
    """Format 2 holds no pickle: Namespaces, enums, dtypes, tuples, other dict keys and tensors
    (Transformer Engine's byte-tensor state, TE 1.x's torch.save archive) come back equal."""
    from megatron.core.transformer.enums import AttnBackend

    from megatron_switch.checkpoint.consolidated import write_consolidated

    te_bytes = torch.frombuffer(bytearray(pickle.dumps({"scale_fwd": torch.ones(2)})), dtype=torch.uint8)
    te1 = io.BytesIO()
    torch.save({"scale_fwd": torch.full((2,), 3.0), "extra_fp8_variables": {"num_gemms": 2}}, te1)
    objects = {"a._extra_state": None, "b._extra_state": te_bytes, "c._extra_state": te1,
               "d": {"args": argparse.Namespace(params_dtype=torch.bfloat16, attention_backend=AttnBackend.auto,
                                                sizes=(1, 2), seq=[1.5, "x", None]),
                     "by_index": {0: torch.arange(3), 1: "y"}, "__type__": "a key that looks like a tag"}}
    reader = open_checkpoint(str(ckpts["torch_dist"]))
    reader.objects = objects
    write_consolidated(str(tmp_path / "st"), reader, sorted(reader.tensors), reader.common, None)
    reader.close()
    text = (tmp_path / "st" / "model.safetensors.index.json").read_text()
    assert "UEsDB" not in text  # no base64 zip archive (torch.save) anywhere in the index
    assert (tmp_path / "st" / "objects.safetensors").is_file()
    back = open_checkpoint(str(tmp_path / "st")).objects
    assert back.keys() == objects.keys() and back["a._extra_state"] is None
    assert torch.equal(back["b._extra_state"], te_bytes)
    assert torch.equal(torch.load(back["c._extra_state"])["scale_fwd"], torch.full((2,), 3.0))
    args = back["d"]["args"]
    assert isinstance(args, argparse.Namespace) and args.params_dtype is torch.bfloat16
    assert args.attention_backend is AttnBackend.auto and args.sizes == (1, 2) and args.seq == [1.5, "x", None]
    assert torch.equal(back["d"]["by_index"][0], torch.arange(3)) and back["d"]["by_index"][1] == "y"
    assert back["d"]["__type__"] == "a key that looks like a tag"

    # An enum class off the allow-list is never imported from an index.
    file, index = _index(tmp_path / "st")
    index["metadata"]["objects"]["e"] = {"__type__": "enum", "module": "os", "class": "system", "member": "x"}
    file.write_text(json.dumps(index))
    with pytest.raises(CheckpointCodeError, match="os.system"):
        open_checkpoint(str(tmp_path / "st"))


def test_huggingface_weights_are_read_tensors_only(tmp_path):
    from megatron_switch.checkpoint.huggingface import read_huggingface_weights

    sentinel = tmp_path / "SENTINEL"
    weights = {"shared.weight": torch.randn(8, 4), "lm_head.weight": torch.randn(8, 4)}
    (tmp_path / "bin").mkdir()
    torch.save(weights, tmp_path / "bin" / "pytorch_model.bin")
    found = read_huggingface_weights(str(tmp_path / "bin"))
    assert found.keys() == weights.keys() and all(torch.equal(found[k], weights[k]) for k in weights)

    (tmp_path / "sharded").mkdir()
    for i, key in enumerate(weights):
        torch.save({key: weights[key]}, tmp_path / "sharded" / f"pytorch_model-{i}.bin")
    (tmp_path / "sharded" / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {key: f"pytorch_model-{i}.bin" for i, key in enumerate(weights)}}))
    assert read_huggingface_weights(str(tmp_path / "sharded")).keys() == weights.keys()

    (tmp_path / "st").mkdir()
    from safetensors.torch import save_file

    save_file(weights, str(tmp_path / "st" / "model.safetensors"))
    torch.save({"x": _Touch(sentinel)}, tmp_path / "st" / "pytorch_model.bin")  # never opened: safetensors first
    assert read_huggingface_weights(str(tmp_path / "st")).keys() == weights.keys()

    (tmp_path / "crafted").mkdir()
    torch.save({**weights, "x": _Touch(sentinel)}, tmp_path / "crafted" / "pytorch_model.bin")
    with pytest.raises(CheckpointCodeError) as err:
        read_huggingface_weights(str(tmp_path / "crafted"))
    _refused(err.value, tmp_path / "crafted" / "pytorch_model.bin")
    torch.save({**weights, "args": argparse.Namespace()}, tmp_path / "crafted" / "pytorch_model.bin")
    with pytest.raises(CheckpointCodeError, match="argparse.Namespace, which is not among the globals weight files"):
        read_huggingface_weights(str(tmp_path / "crafted"))  # a weights file holds tensors only
    assert not sentinel.exists()


def test_tokenizer_folders_never_run_their_code(tmp_path):
    """A tokenizer folder may ship Python (auto_map): it is never imported; the tokenizer is refused."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_switch.data.tokenizers import HuggingFaceTokenizer

    sentinel = tmp_path / "SENTINEL"
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenization_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(sentinel)!r}).touch()\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CustomTokenizer", "eos_token": "b",
         "auto_map": {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}}))
    with pytest.raises(ValueError, match="needs Python code from its folder.*never runs"):
        HuggingFaceTokenizer(str(folder))
    assert not sentinel.exists()
    # The folder's code is live: transformers runs it when told to trust it.
    trusting = subprocess.run([sys.executable, "-c", "from transformers import AutoTokenizer\n"
                               f"AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)"],
                              env=dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules")),
                              capture_output=True, text=True, check=False)
    assert sentinel.exists(), trusting.stderr[-2000:]


def _megatron_lm_shaped(source, target) -> None:
    """A copy of our legacy checkpoint `source` shaped like Megatron-LM's own: its args hold dtypes,
    enums, a signal and a path; an rng_state (python, numpy and torch states); float32 master weights
    carrying tensor-parallel attributes (as Megatron's mixed-precision optimizer keeps them)."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    _copy_to_craft(source, target)
    file = _rank_file(target)
    state = torch.load(file, weights_only=False)  # our own file: trusted here
    args = state["args"]
    args.params_dtype, args.main_grads_dtype, args.exp_avg_dtype = torch.bfloat16, torch.float32, torch.uint8
    args.attention_backend, args.model_type = AttnBackend.auto, ModelType.encoder_or_decoder
    args.exit_signal, args.save = signal.SIGTERM, pathlib.PosixPath("/checkpoints/run")
    args.cuda_graph_scope = []
    state["rng_state"] = [{"random_rng_state": random.getstate(), "np_rng_state": numpy.random.get_state(),
                           "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}]
    state["rerun_state_machine"] = None
    for group in state["optimizer"]["fp32_from_fp16_params"]:
        for master in group:
            if master is not None:
                master.tensor_model_parallel, master.partition_dim, master.partition_stride = False, -1, 1
    torch.save(state, file)


def test_megatron_lm_shaped_legacy_files_load_and_convert_bit_identically(ckpts, tmp_path):
    _megatron_lm_shaped(ckpts["torch"], tmp_path / "mlm")
    state = safe_pickle.load(_rank_file(tmp_path / "mlm"), trusted=False)
    assert state["args"].exit_signal is signal.SIGTERM and state["args"].params_dtype is torch.bfloat16
    assert state["optimizer"]["fp32_from_fp16_params"][0][0].tensor_model_parallel is False
    expected = _tensors(ckpts["torch_dist"])
    assert _tensors(tmp_path / "mlm").keys() == expected.keys()
    current = tmp_path / "mlm"
    for fmt in ("torch_dist", "safetensors", "torch"):
        convert(str(current), str(tmp_path / fmt), fmt=fmt, progress=False, log=_quiet)
        found = _tensors(tmp_path / fmt)
        assert found.keys() == expected.keys(), fmt
        assert all(found[n].dtype == expected[n].dtype and torch.equal(found[n], expected[n]) for n in expected), fmt
        current = tmp_path / fmt
    resumed = run_train([*RUN[:-1], "3", "--load", str(tmp_path / "mlm"), "--plots-dir", str(tmp_path / "plots")],
                        tmp_path)
    assert "at iteration 2" in resumed.stdout


def _globals(data: bytes) -> set[tuple[str, str]]:
    """(module, name) of every global a pickle names, read without resolving any of them."""
    class Anything:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            return Anything()

        def __setstate__(self, state):
            pass

        def __setitem__(self, key, value):
            pass

        def append(self, value):
            pass

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return Anything

        def persistent_load(self, saved_id):
            return None

    found: set[tuple[str, str]] = set()
    Recorder(io.BytesIO(data)).load()
    return found


def _archive_globals(path) -> set[tuple[str, str]]:
    with open(path, "rb") as f:
        return _globals(torch._C.PyTorchFileReader(f).get_record("data.pkl"))


def test_allow_lists_hold_every_global_real_checkpoints_name(ckpts, tmp_path):
    """Our files (trainer --bf16 torch_dist, converted legacy and torch_dist, Megatron-LM-shaped legacy)
    name only allow-listed globals, and name the ones the lists say they hold."""
    from megatron_switch.checkpoint.distcp import read_metadata

    convert(str(ckpts["torch"]), str(tmp_path / "dist"), fmt="torch_dist", progress=False, log=_quiet)
    _megatron_lm_shaped(ckpts["torch"], tmp_path / "mlm")
    legacy = _archive_globals(_rank_file(ckpts["torch"])) | _archive_globals(_rank_file(tmp_path / "mlm"))
    assert legacy <= safe_pickle.CHECKPOINT.names
    assert {("argparse", "Namespace"), ("torch._tensor", "_rebuild_from_type_v2"), ("signal", "Signals"),
            ("megatron.core.transformer.enums", "AttnBackend"), ("numpy", "ndarray"), ("torch", "bfloat16")} <= legacy
    metadata = set()
    for root in (ckpts["torch_dist"] / ITER, tmp_path / "dist" / ITER):
        metadata |= _globals((root / ".metadata").read_bytes())
        if (root / "common.pt").is_file():  # (megatron-core >= 0.19 keeps it inside the checkpoint)
            assert _archive_globals(root / "common.pt") <= safe_pickle.CHECKPOINT.names
        read_metadata(str(root), trusted=False)
    assert metadata <= safe_pickle.DCP_METADATA.names
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in metadata


def test_unpickler_resolves_exact_names_only():
    """A dotted name reaches attributes of an allowed class (pathlib.PosixPath.write_text): refused."""
    class WriteText:
        def __reduce__(self):
            return (pathlib.PosixPath.write_text, (pathlib.PosixPath("/nonexistent/x"), "x"))

    with pytest.raises(CheckpointCodeError, match="pathlib.Path.write_text"):
        safe_pickle.Unpickler(io.BytesIO(pickle.dumps(WriteText())), trusted=False, what="x").load()


# -- A checkpoint reads only itself: no paths out of its folder, no sizes that exhaust memory ------------------

def test_an_oversized_tracker_is_refused_after_a_capped_read(tmp_path):
    """A tracker holds an iteration number; one of 1 MiB (spaces after the number: `strip` would accept it)
    is refused, naming the file, without being read whole."""
    from megatron_switch.checkpoint.layout import TRACKER, TRACKER_LIMIT, CheckpointError, latest_checkpoint

    (tmp_path / ITER / "mp_rank_00").mkdir(parents=True)
    tracker = tmp_path / TRACKER
    tracker.write_bytes(b"2" + b" " * (1 << 20))
    with pytest.raises(CheckpointError, match=f"{tracker}: {(1 << 20) + 1} bytes, more than a tracker holds "
                                              f"\\(at most {TRACKER_LIMIT}\\)"):
        latest_checkpoint(str(tmp_path))
    tracker.write_bytes(b"2\n")
    assert latest_checkpoint(str(tmp_path)) == (2, str(tmp_path / ITER))
