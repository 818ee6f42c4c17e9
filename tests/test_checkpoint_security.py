"""Opening a checkpoint never runs code from it: a crafted pickle in each place one is read (a legacy
rank file, torch_dist's common state, `.metadata` and objects, a consolidated index of format 1, a
Transformer Engine extra state, a Hugging Face .bin) is refused with an error naming the global and
the file, and the code it names does not run (the sentinel file it would create does not appear);
`--trust-checkpoint-code` loads it (and runs it). Real checkpoints of every format, ours and
Megatron-LM-shaped, still load and convert bit-identically, and the allow-lists hold every global
their pickles name.

A checkpoint also reads only itself: each crafted file (a storage index, weight map, integrity entry or
rank file naming a file outside the folder; sizes in configs, trackers, zip members, tensor records,
rank-file arguments and `.idx` entries beyond what the files hold; malformed integrity entries) is
planted, refused with a message naming the record, and, where a file outside was named, that file
is watched with inotify and never opened."""

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
from megatron_switch.checkpoint.layout import CheckpointError
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
    from megatron_switch.checkpoint.layout import TRACKER, TRACKER_LIMIT, latest_checkpoint

    (tmp_path / ITER / "mp_rank_00").mkdir(parents=True)
    tracker = tmp_path / TRACKER
    tracker.write_bytes(b"2" + b" " * (1 << 20))
    with pytest.raises(CheckpointError, match=f"{tracker}: {(1 << 20) + 1} bytes, more than a tracker holds "
                                              f"\\(at most {TRACKER_LIMIT}\\)"):
        latest_checkpoint(str(tmp_path))
    tracker.write_bytes(b"2\n")
    assert latest_checkpoint(str(tmp_path)) == (2, str(tmp_path / ITER))


class _Watch:
    """Files opened or read in folder `outside` while the watch lasts, by any process in any language
    (Linux inotify: safetensors opens files from Rust, torch from C++, the trainer in other
    processes; an audit hook would see only this interpreter's Python opens)."""

    _OPEN, _ACCESS, _NONBLOCK, _ISDIR = 0x20, 0x1, 0o4000, 0x40000000

    def __init__(self, outside):
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(self._NONBLOCK)
        assert self.fd >= 0 and self._libc.inotify_add_watch(self.fd, str(outside).encode(),
                                                            self._OPEN | self._ACCESS) >= 0
        self.seen: set[str] = set()

    def opened(self) -> set[str]:
        import struct

        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return self.seen
            at = 0
            while at < len(data):
                _, mask, _, size = struct.unpack_from("iIII", data, at)
                if not mask & self._ISDIR:
                    self.seen.add(data[at + 16:at + 16 + size].rstrip(b"\0").decode())
                at += 16 + size

    def __enter__(self) -> _Watch:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _outside(tmp_path) -> pathlib.Path:
    (tmp_path / "outside").mkdir(exist_ok=True)
    return tmp_path / "outside"


def _rewrite_metadata(iteration, edit) -> None:
    """torch_dist `.metadata` of `iteration` (our own file: unpickled plainly here) after `edit(metadata)`."""
    with open(iteration / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    edit(metadata)
    with open(iteration / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def _name_outside(metadata, target: str) -> None:
    for info in metadata.storage_data.values():
        if info.relative_path == "__0_0.distcp":
            info.relative_path = target


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_a_torch_dist_storage_index_naming_a_file_outside_is_refused_unopened(ckpts, tmp_path, absolute):
    """`.metadata` whose storage entries name ../../outside/__0_0.distcp (or its absolute path), a real
    shard moved out of the checkpoint: convert and the trainer's --load refuse it, naming the entry and
    the path, and neither opens the file (they read it into the new checkpoint before)."""
    outside = _outside(tmp_path)
    crafted = tmp_path / "crafted"
    _copy_to_craft(ckpts["torch_dist"], crafted)
    shutil.move(crafted / ITER / "__0_0.distcp", outside / "__0_0.distcp")
    name = str(outside / "__0_0.distcp") if absolute else "../../outside/__0_0.distcp"
    _rewrite_metadata(crafted / ITER, lambda metadata: _name_outside(metadata, name))
    message = f"names '{name}', a path outside the checkpoint's folder {crafted / ITER}"
    with _Watch(outside) as watch:
        with pytest.raises(CheckpointError, match="the storage entry of .*" + message.replace(".", r"\.")):
            convert(str(crafted), str(tmp_path / "out"), fmt="torch_dist", progress=False, log=_quiet)
        if not absolute:  # (the trainer's --load, once: both forms are the same check)
            proc = run_train([*RUN[:-1], "3", "--load", str(crafted), "--plots-dir", str(tmp_path / "plots")],
                             tmp_path, check=False)
            assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert watch.opened() == set()
    assert not (tmp_path / "out").exists()


def test_a_torch_dist_storage_index_beyond_its_files_is_refused(ckpts, tmp_path):
    """Sizes in `.metadata` bounded by the files: a byte range past the end of its file, a tensor whose
    shape its chunks do not hold (a [10^6 x ...] embedding read whole would allocate gigabytes)."""
    from megatron_switch.checkpoint.distcp import read_metadata

    crafted = tmp_path / "crafted"
    _copy_to_craft(ckpts["torch_dist"], crafted)
    size = (crafted / ITER / "__0_0.distcp").stat().st_size

    def past_the_end(metadata):
        info = next(i for i in metadata.storage_data.values() if i.relative_path == "__0_0.distcp")
        info.length = size + 1

    _rewrite_metadata(crafted / ITER, past_the_end)
    with pytest.raises(CheckpointError, match=f"bytes .* of __0_0.distcp, which holds {size} bytes"):
        read_metadata(str(crafted / ITER), trusted=False)
    shutil.copy(ckpts["torch_dist"] / ITER / ".metadata", crafted / ITER / ".metadata")

    def wider(metadata):
        meta = metadata.state_dict_metadata["embedding.word_embeddings.weight"]
        meta.size = torch.Size([10**6, *meta.size[1:]])

    _rewrite_metadata(crafted / ITER, wider)
    with pytest.raises(CheckpointError, match=r"tensor embedding.word_embeddings.weight has shape \(1000000, 64\) "
                                           r"\(64000000 elements\), its chunks hold 24576"):
        convert(str(crafted), str(tmp_path / "out"), progress=False, log=_quiet)


def test_integrity_records_naming_files_outside_are_refused_unopened(ckpts, tmp_path):
    """An integrity.json entry naming ../../outside/secret.txt with that file's real SHA-256 made convert
    and the trainer open and hash it (and load: a probe for what any readable file holds); refused."""
    import hashlib

    outside = _outside(tmp_path)
    secret = outside / "secret.txt"
    secret.write_text("a file outside the checkpoint\n")
    crafted = tmp_path / "crafted"
    shutil.copytree(ckpts["torch_dist"], crafted)
    record = json.loads((crafted / ITER / "integrity.json").read_text())
    record["entries"].append({"what": "probe", "file": "../../outside/secret.txt", "start": 0, "length": 30,
                              "sha256": hashlib.sha256(secret.read_bytes()).hexdigest()})
    (crafted / ITER / "integrity.json").write_text(json.dumps(record))
    message = (f"integrity.json: entry {len(record['entries']) - 1} (probe) names '../../outside/secret.txt', a "
               f"path outside the checkpoint's folder {crafted / ITER}")
    with _Watch(outside) as watch:
        with pytest.raises(CheckpointError) as err:
            convert(str(crafted), str(tmp_path / "out"), progress=False, log=_quiet)
        assert message in str(err.value)
        proc = run_train([*RUN[:-1], "3", "--load", str(crafted), "--plots-dir", str(tmp_path / "plots")], tmp_path,
                         check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert watch.opened() == set()


MALFORMED_ENTRIES = {
    "negative length": ({"length": -5}, "entry 0 (.*): length is -5, not a byte count"),
    "negative start": ({"start": -5}, "entry 0 (.*): start is -5, not a byte count"),
    "file not a string": ({"file": 7}, "entry 0 (.*) names 7, which is not a file name"),
    "checksum not hex": ({"sha256": "x" * 64}, "entry 0 (.*): sha256 is 'xxx.*', not a SHA-256"),
}


@pytest.mark.parametrize("case", list(MALFORMED_ENTRIES))
def test_malformed_integrity_entries_are_named_not_tracebacks(ckpts, tmp_path, case):
    """A negative length or start, or a file that is not a string, raised from deep in the hashing
    (ValueError, OSError, TypeError tracebacks): each is refused naming the entry."""
    edit, message = MALFORMED_ENTRIES[case]
    crafted = tmp_path / "crafted"
    shutil.copytree(ckpts["torch_dist"], crafted)
    record = json.loads((crafted / ITER / "integrity.json").read_text())
    record["entries"][0].update(edit)
    (crafted / ITER / "integrity.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=f"{crafted / ITER / 'integrity.json'}: {message}"):
        open_checkpoint(str(crafted))
    if case == "negative length":
        done = _cli_convert("--load", crafted, "--save", tmp_path / "out")
        assert done.returncode == 1 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_a_consolidated_weight_map_naming_a_file_outside_is_refused_unopened(ckpts, tmp_path, absolute):
    outside = _outside(tmp_path)
    crafted = tmp_path / "crafted"
    shutil.copytree(ckpts["safetensors"], crafted)
    shutil.move(crafted / "model.safetensors", outside / "model.safetensors")
    name = str(outside / "model.safetensors") if absolute else "../outside/model.safetensors"
    index = json.loads((crafted / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: name if v == "model.safetensors" else v for k, v in index["weight_map"].items()}
    (crafted / "model.safetensors.index.json").write_text(json.dumps(index))
    with _Watch(outside) as watch:
        with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: the weight_map entry of .* names "
                                               f"'{name}', a path outside the checkpoint's folder {crafted}"):
            convert(str(crafted), str(tmp_path / "out"), fmt="torch_dist", progress=False, log=_quiet)
        assert watch.opened() == set()


def test_a_rank_file_linked_from_outside_is_refused_unopened(ckpts, tmp_path):
    """Legacy rank files are found by name; one that is a symbolic link out of the checkpoint is refused by
    convert and by the trainer's reader (`read_legacy_file`), which never open it."""
    from megatron_switch.parallel import Layout
    from megatron_switch.training.legacy_load import read_legacy_file

    outside = _outside(tmp_path)
    crafted = tmp_path / "crafted"
    _copy_to_craft(ckpts["torch"], crafted)
    file = _rank_file(crafted)
    shutil.move(file, outside / "model_optim_rng.pt")
    file.symlink_to(outside / "model_optim_rng.pt")
    message = (f"the rank file names 'mp_rank_00/model_optim_rng.pt', which resolves (through a symbolic link) "
               f"to {outside / 'model_optim_rng.pt'}, outside the checkpoint's folder {crafted / ITER}")
    with _Watch(outside) as watch:
        with pytest.raises(CheckpointError) as err:
            convert(str(crafted), str(tmp_path / "out"), fmt="torch_dist", progress=False, log=_quiet)
        assert message in str(err.value)
        with pytest.raises(CheckpointError) as err:
            read_legacy_file(str(crafted / ITER), str(file), Layout())
        assert message in str(err.value)
        assert watch.opened() == set()


def _rewrite_rank_file(file, members: dict) -> None:
    """Rank file `file` (a torch.save zip) with `members` {name: (bytes, compression)} in place of its own."""
    import zipfile

    new = file.with_suffix(".new")
    with zipfile.ZipFile(file) as source, zipfile.ZipFile(new, "w") as target:
        for info in source.infolist():
            data, method = members.get(info.filename.split("/", 1)[1], (source.read(info), zipfile.ZIP_STORED))
            target.writestr(zipfile.ZipInfo(info.filename), data, compress_type=method, compresslevel=1)
    os.replace(new, file)


def test_a_rank_file_whose_pickle_inflates_past_what_a_checkpoint_holds_is_refused(ckpts, tmp_path):
    """data.pkl deflated: a few MB on disk, 300 MiB declared (it was inflated and unpickled, 2.4 GB for a
    1 GiB one); refused by convert and by the trainer's reader, trusted or not, before inflating."""
    import zipfile

    from megatron_switch.checkpoint import safe_pickle

    crafted = tmp_path / "crafted"
    _copy_to_craft(ckpts["torch"], crafted)
    file = _rank_file(crafted)
    with zipfile.ZipFile(file) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    _rewrite_rank_file(file, {"data.pkl": (pickled + bytes(300 << 20), zipfile.ZIP_DEFLATED)})
    assert file.stat().st_size < 16 << 20
    message = f"declares {len(pickled) + (300 << 20)} bytes of pickled structure, more than a checkpoint's holds"
    with pytest.raises(CheckpointError, match=message):
        convert(str(crafted), str(tmp_path / "out"), progress=False, log=_quiet)
    for trusted in (False, True):
        with pytest.raises(CheckpointError, match=message):
            safe_pickle.load(str(file), trusted=trusted)


@pytest.mark.parametrize("how", ["size", "offset", "stride"])
def test_tensor_records_beyond_their_storage_are_refused_by_one_check(ckpts, tmp_path, how):
    """A tensor record whose size, offset or stride reaches past its storage: convert raised torch's
    `Trying to resize storage that is not resizable`; convert and the trainer's reader (`load`) now
    refuse it with the same words (`safe_pickle.check_tensor_record`)."""
    import collections

    from megatron_switch.checkpoint import safe_pickle

    class Record:
        def __init__(self, tensor, offset, size, stride):
            self.args = (tensor.untyped_storage(), tensor.dtype, offset, size, stride)

        def __reduce_ex__(self, protocol):
            storage, dtype, offset, size, stride = self.args
            return (torch._utils._rebuild_tensor_v2,
                    (torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True), offset, size,
                     stride, False, collections.OrderedDict()))

    crafted = tmp_path / "crafted"
    _copy_to_craft(ckpts["torch"], crafted)
    file = _rank_file(crafted)
    state = torch.load(file, weights_only=False)
    tensor = state["model"]["decoder.final_layernorm.weight"]
    n = tensor.numel()
    offset, size, stride = {"size": (0, (1000 * n,), (1,)), "offset": (1000 * n, (n,), (1,)),
                            "stride": (0, (n,), (1000,))}[how]
    state["model"]["decoder.final_layernorm.weight"] = Record(tensor, offset, size, stride)
    torch.save(state, file)
    message = (f"a tensor record of shape {size}, stride {stride} at offset {offset} reaches element "
               f"{offset + 1 + (size[0] - 1) * stride[0]} of storage data/.*, which holds {n}")
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert(str(crafted), str(tmp_path / "out"), progress=False, log=_quiet)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        safe_pickle.load(str(file), trusted=False)
    if how == "size":
        done = _cli_convert("--load", crafted, "--save", tmp_path / "out")
        assert done.returncode == 1 and "Traceback" not in done.stderr and "reaches element" in done.stderr


def test_sizes_in_rank_file_args_are_bounded_by_the_rank_files(ckpts, tmp_path):
    """args.tensor_model_parallel_size of 10^9 built a list of 10^9 rank files (killed past 3 GB); a
    num_layers the files do not hold placed layers on stages that do not exist."""
    crafted = tmp_path / "crafted"
    _copy_to_craft(ckpts["torch"], crafted)
    file = _rank_file(crafted)
    state = torch.load(file, weights_only=False)
    state["args"].tensor_model_parallel_size = 10**9
    torch.save(state, file)
    with pytest.raises(CheckpointError, match="args.tensor_model_parallel_size is 1000000000, but the checkpoint has 1 "
                                           "mp_rank_. directories"):
        convert(str(crafted), str(tmp_path / "out"), progress=False, log=_quiet)
    state["args"].tensor_model_parallel_size = 1
    state["args"].num_layers = 10**9
    torch.save(state, file)
    with pytest.raises(CheckpointError, match=r"args.num_layers is 1000000000, but its 4 layers x 1 pipeline stages "
                                           r"make 4"):
        convert(str(crafted), str(tmp_path / "out"), progress=False, log=_quiet)


def test_a_model_config_that_disagrees_with_its_tensors_is_refused(ckpts, tmp_path):
    """A torch_dist common state whose model_config says 10^9 layers (a layout's stages and layer lists
    are built from it): refused, naming the field, before anything is laid out."""
    from megatron_switch.checkpoint.distcp import read_common_state

    crafted = tmp_path / "crafted"
    _copy_to_craft(ckpts["torch_dist"], crafted)
    state = read_common_state(str(crafted / ITER), trusted=True)
    state["model_config"] = {**state["model_config"], "num_layers": 10**9}
    torch.save(state, crafted / ITER / "common.pt")
    with pytest.raises(CheckpointError, match="model_config gives num_layers 1000000000, its tensors hold 4 layers"):
        convert(str(crafted), str(tmp_path / "out"), target_pp=3, progress=False, log=_quiet)


HF_COUNTS = {"num_experts": "num_experts is 1000000000, the weights hold 4 experts per sparse layer",
             "num_layers": "num_layers is 1000000000, the weights hold 4 encoder blocks",
             "num_decoder_layers": "num_decoder_layers is 1000000000, the weights hold 4 decoder blocks"}


def test_hugging_face_and_model_configs_disagreeing_with_their_weights_are_refused(tmp_path):
    """config.json with num_experts, num_layers or num_decoder_layers of 10^9 (its tensors small) built
    lists of names 10^9 long (6.5 GB after 40 s, or the OOM killer): refused naming the field, before
    any list is built; likewise a model_config of ours exported to Hugging Face."""
    pytest.importorskip("transformers")
    from megatron_switch.checkpoint.distcp import read_common_state
    from megatron_switch.checkpoint.huggingface_convert import export_huggingface, import_huggingface
    from tests.test_hf_convert import hf_switch, save_hf

    folder = pathlib.Path(save_hf(hf_switch(4, 2, True, "relu", seed=1), tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    for field, message in HF_COUNTS.items():
        (folder / "config.json").write_text(json.dumps({**config, field: 10**9}))
        with pytest.raises(CheckpointError, match=f"{folder}/config.json does not describe these weights: {message}"):
            import_huggingface(str(folder), str(tmp_path / "out"), progress=False, log=_quiet)
    (folder / "config.json").write_text(json.dumps({**config, "note": " " * (1 << 20)}))
    with pytest.raises(CheckpointError, match=r"config.json: \d+ bytes, more than a model config holds"):
        import_huggingface(str(folder), str(tmp_path / "out"), progress=False, log=_quiet)
    (folder / "config.json").write_text(json.dumps(config))
    import_huggingface(str(folder), str(tmp_path / "ours"), progress=False, log=_quiet)
    assert not (tmp_path / "out").exists()

    iteration = tmp_path / "ours" / "iter_0000000"
    (iteration / "integrity.json").unlink()  # a crafted checkpoint brings none
    state = read_common_state(str(iteration), trusted=True)
    state["model_config"] = {**state["model_config"], "encoder_num_layers": 10**9}
    torch.save(state, iteration / "common.pt")
    with pytest.raises(CheckpointError, match="its model_config does not describe these weights: encoder_num_layers "
                                              "is 1000000000, the weights hold 4 encoder layers"):
        export_huggingface(str(tmp_path / "ours"), str(tmp_path / "exported"), progress=False, log=_quiet)


def _hf_cache(root, weights: dict) -> pathlib.Path:
    """A Hugging Face download cache of one model: `snapshots/REV/*` are links to `../../blobs/<sha256>`."""
    import hashlib

    from safetensors.torch import save_file

    repo = root / "models--org--switch"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    files = {f"model-0000{i + 1}-of-00002.safetensors": {k: weights[k]} for i, k in enumerate(weights)}
    for name, tensors in files.items():
        save_file(tensors, str(root / name))
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, tensors in files.items() for k in tensors}}))
    for name in [*files, "model.safetensors.index.json"]:
        blob = hashlib.sha256((root / name).read_bytes()).hexdigest()
        shutil.move(root / name, repo / "blobs" / blob)
        (snapshot / name).symlink_to(f"../../blobs/{blob}")
    return snapshot


def test_a_hugging_face_cache_snapshot_is_followed_into_its_blobs_and_nowhere_else(tmp_path):
    """A revision folder of the download cache holds links to its repository's blobs: read as before.
    A weight index naming a path out of the folder, or a shard linked anywhere else (another folder,
    another repository's blobs), is refused and never opened."""
    from megatron_switch.checkpoint.huggingface import read_huggingface_weights

    weights = {"shared.weight": torch.randn(8, 4), "lm_head.weight": torch.randn(8, 4)}
    snapshot = _hf_cache(tmp_path, weights)
    found = read_huggingface_weights(str(snapshot))
    assert found.keys() == weights.keys() and all(torch.equal(found[k], weights[k]) for k in weights)

    outside = _outside(tmp_path)
    other = tmp_path / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    shard = snapshot / "model-00001-of-00002.safetensors"
    for place in (outside, other):
        shutil.copy(shard, place / "stolen.safetensors")
    index = snapshot / "model.safetensors.index.json"
    blob = os.readlink(index)
    with _Watch(outside) as watch, _Watch(other) as watch_other:
        index.unlink()
        index.write_text(json.dumps({"weight_map": {"shared.weight": "../../../outside/stolen.safetensors",
                                                    "lm_head.weight": "model-00002-of-00002.safetensors"}}))
        with pytest.raises(CheckpointError, match="model.safetensors.index.json: the weight_map entry of shared.weight "
                                                  "names '../../../outside/stolen.safetensors', a path outside"):
            read_huggingface_weights(str(snapshot))
        index.unlink()
        index.symlink_to(blob)
        for place in (outside, other):
            shard.unlink()
            shard.symlink_to(place / "stolen.safetensors")
            with pytest.raises(CheckpointError, match=f"names 'model-00001-of-00002.safetensors', which resolves "
                                                      f"\\(through a symbolic link\\) to {place}/stolen.safetensors"):
                read_huggingface_weights(str(snapshot))
        assert watch.opened() == set() and watch_other.opened() == set()


IDX_CASES = {  # (which entry, its new value), the message
    "negative length": (("lengths", 20, -700), "sequence 20 (of 50) has a negative length, -700"),
    "pointer past the .bin": (("pointers", 20, 10**9), "sequence 20 (of 50) lies at bytes 1000000000..1000002800"),
    "document index past the sequences": (("documents", 20, 10**9), "document index entry 20 (of 51) is 1000000000"),
}


@pytest.mark.parametrize("case", list(IDX_CASES))
def test_indexed_data_is_checked_whole_before_it_is_read(tmp_path, case):
    """A .idx entry in the middle that megatron-core's reader takes as it is (a negative length read as
    the rest of the .bin, a pointer past the .bin that fails only when sampled, a document index of
    10^9): refused on open, naming the file, the entry and the fix, by the launcher too."""
    import struct

    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_switch.data.check import DataError, dataset_tokens

    prefix = tmp_path / "data"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    for document in range(50):
        builder.add_document(torch.arange(700) % 250 + document, [700])
    builder.finalize(f"{prefix}.idx")
    assert dataset_tokens(str(prefix)) == 50 * 700
    (array, entry, value), message = IDX_CASES[case]
    header, sequences = 34, 50
    at, kind = {"lengths": (header, "<i"), "pointers": (header + 4 * sequences, "<q"),
                "documents": (header + 12 * sequences, "<q")}[array]
    data = bytearray((tmp_path / "data.idx").read_bytes())
    struct.pack_into(kind, data, at + struct.calcsize(kind) * entry, value)
    (tmp_path / "data.idx").write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        dataset_tokens(str(prefix))
    assert str(err.value).startswith(f"{prefix}.idx: {message}") and "megatron-switch preprocess" in str(err.value)
    if case == "negative length":
        proc = run_train([*SMALL, "--train-iters", "1", "--data-path", str(prefix), "--split", "1,0,0"], tmp_path,
                         check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
