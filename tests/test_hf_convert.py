"""`megatron-switch convert --from-hf` / `--to-hf`: Hugging Face Switch Transformers folders, written by
`save_pretrained` from tiny random models (several shards; ReLU and gated GELU; Switch layers every 2nd
layer and every layer; tied and untied embeddings), imported at EP=1, EP=2 and TP=2 x EP=2 and loaded
there by megatron's dist_checkpointing: the same logits as Hugging Face (float32, a capacity that drops
nothing). Hugging Face -> ours -> Hugging Face gives the same tensors, bit for bit; a run started from
the imported checkpoint with the flags convert wrote learns; every bad input is named and leaves nothing.

Hugging Face's SwitchTransformers has no gated FFN: the gated-GELU folder is written by a model whose FFNs
are Hugging Face's T5 v1.1 `T5DenseGatedActDense` (as T5X computes Switch T5 v1.1), which also gives its
logits."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex

import pytest
import torch

from megatron_switch.checkpoint.convert import main as convert_main
from megatron_switch.checkpoint.huggingface import HuggingFaceFolder
from megatron_switch.checkpoint.huggingface_convert import TRAIN_FLAGS, HuggingFaceReader
from megatron_switch.data.span_corruption import t5_attention_masks
from megatron_switch.specs.t5_model import build_switch_t5
from tests.helpers import spawn, with_gated_gelu_ffns
from tests.test_train import metrics, run_train

transformers = pytest.importorskip("transformers", minversion="5.24")

V, H, D_KV, HEADS, FFN, E = 48, 16, 8, 2, 24, 4
ENC_LEN, DEC_LEN = 24, 10


def hf_switch(layers: int, interval: int, tied: bool, activation: str, vocab: int = V, seed: int = 0):
    """A random Hugging Face Switch T5 (norm weights around 1; the stacks' input embeddings equal `shared`,
    as megatron's T5 has one)."""
    config = transformers.SwitchTransformersConfig(
        vocab_size=vocab, d_model=H, d_kv=D_KV, d_ff=FFN, num_layers=layers, num_decoder_layers=layers,
        num_heads=HEADS, num_experts=E, num_sparse_encoder_layers=layers // interval,
        num_sparse_decoder_layers=layers // interval, expert_capacity=ENC_LEN, router_jitter_noise=0.0,
        dropout_rate=0.0, tie_word_embeddings=tied, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, dense_act_fn="relu" if activation == "relu" else "gelu_new")
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    if activation == "gated-gelu":
        with_gated_gelu_ffns(model, H, FFN)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if "layer_norm" in name else noise * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))
        if not tied:
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    return model.eval()


def save_hf(model, folder, shard="20KB") -> str:
    model.save_pretrained(str(folder), max_shard_size=shard)
    return str(folder)


def as_bin_shards(folder) -> None:
    """The folder's safetensors shards as `pytorch_model-*.bin` files (torch.save), the layout of older
    releases (Hugging Face 5 writes safetensors only)."""
    index_file = os.path.join(folder, "model.safetensors.index.json")
    with open(index_file) as f:
        index = json.load(f)
    weights = HuggingFaceFolder(folder)
    shards = sorted(set(index["weight_map"].values()))
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        members = [k for k, v in index["weight_map"].items() if v == shard]
        torch.save({k: weights.read(k) for k in members}, os.path.join(folder, name))
        weight_map.update(dict.fromkeys(members, name))
        os.remove(os.path.join(folder, shard))
    weights.close()
    os.remove(index_file)
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": index["metadata"], "weight_map": weight_map}, f)


def batch(seed: int = 1, size: int = 2):
    generator = torch.Generator().manual_seed(seed)
    enc = torch.randint(0, V, (size, ENC_LEN), generator=generator)
    dec = torch.randint(0, V, (size, DEC_LEN), generator=generator)
    real = torch.ones(size, ENC_LEN, dtype=torch.long)
    real[-1, -5:] = 0
    return enc, dec, real


def hf_logits(model, data):
    enc, dec, real = data
    with torch.no_grad():
        return model(input_ids=enc, attention_mask=real, decoder_input_ids=dec).logits


def convert(*args):
    convert_main([*map(str, args), "--no-progress-bar"])


def dropless(settings):
    """The imported settings with a capacity that drops nothing and no jitter (Hugging Face's expert
    capacity here holds every token)."""
    switch = dataclasses.replace(settings.switch, capacity_factor=None, eval_capacity_factor=None, jitter_eps=0.0)
    return dataclasses.replace(settings, switch=switch)


def _load_and_compare(rank, world_size, tp, ep, settings, root, data, want):
    from megatron_switch import initialize_parallel
    from megatron_switch.compat import apply_cpu_shims
    from megatron_switch.training.checkpointing import load_model_weights

    apply_cpu_shims()  # megatron's tensor-parallel gather of the logits allocates on the current CUDA device
    initialize_parallel(tp=tp, ep=ep, num_experts=E, backend="gloo")
    model = build_switch_t5(settings, parallel_output=False, tensor_model_parallel_size=tp).eval()
    assert load_model_weights(root, model) == 0
    enc, dec, real = data
    with torch.no_grad():
        logits = model(enc, dec, *t5_attention_masks(real, dec.shape[1]))
    torch.testing.assert_close(logits[..., :V], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert float(logits[..., V:].abs().max()) == 0  # Megatron's padded vocabulary rows are zeros


@pytest.mark.parametrize("layers,interval,tied,activation", [
    (4, 2, True, "relu"), (3, 1, False, "relu"), (4, 2, False, "gated-gelu")],
    ids=["every-2nd-tied-relu", "every-layer-untied-relu", "every-2nd-untied-gated"])
def test_imported_checkpoint_gives_hugging_face_logits(tmp_path, layers, interval, tied, activation):
    hf = hf_switch(layers, interval, tied, activation)
    folder = save_hf(hf, tmp_path / "hf")
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 2  # several shards
    data = batch()
    want = hf_logits(hf, data)
    convert("--from-hf", folder, "--save", tmp_path / "ep1")
    settings = dropless(HuggingFaceReader(folder).settings)
    spawn(_load_and_compare, 1, 1, 1, settings, str(tmp_path / "ep1"), data, want)
    convert("--from-hf", folder, "--save", tmp_path / "ep2", "--target-ep", "2")
    spawn(_load_and_compare, 2, 1, 2, settings, str(tmp_path / "ep2"), data, want)
    with open(tmp_path / "ep2" / TRAIN_FLAGS) as f:
        command = shlex.split(f.read().splitlines()[-1])
    assert command[:2] == ["megatron-switch", "train"]
    flags = {flag: value for flag, value in zip(command[2:], [*command[3:], None]) if flag.startswith("--")}
    assert flags["--feed-forward-proj"] == activation and flags["--moe-layer-freq"] == str(interval)
    assert flags["--expert-model-parallel-size"] == "2" and command[-2:] == ["--load", str(tmp_path / "ep2")]
    assert ("--untie-embeddings-and-output-weights" in command) == (not tied)


def test_tensor_and_expert_parallel_import(tmp_path):
    """TP=2 x EP=2: the vocabulary is padded to a multiple of 128 x TP; Megatron loads it at that layout."""
    hf = hf_switch(4, 2, True, "relu", seed=3)
    folder = save_hf(hf, tmp_path / "hf")
    as_bin_shards(folder)  # pytorch_model*.bin shards, read through the allow-list
    data = batch(seed=2)
    convert("--from-hf", folder, "--save", tmp_path / "tp2ep2", "--target-tp", "2", "--target-ep", "2")
    settings = dropless(HuggingFaceReader(folder, tp=2).settings)
    assert settings.vocab_size == 256
    spawn(_load_and_compare, 4, 2, 2, settings, str(tmp_path / "tp2ep2"), data, hf_logits(hf, data))


def _hf_tensors(folder):
    weights = HuggingFaceFolder(folder)
    try:
        return {name: weights.read(name) for name in weights.specs}
    finally:
        weights.close()


@pytest.mark.parametrize("tied,activation", [(True, "relu"), (False, "gated-gelu")], ids=["tied-relu", "untied-gated"])
def test_hugging_face_to_ours_to_hugging_face_is_bit_identical(tmp_path, tied, activation):
    hf = hf_switch(4, 2, tied, activation, seed=5)
    folder = save_hf(hf, tmp_path / "hf")
    convert("--from-hf", folder, "--save", tmp_path / "ours", "--target-ep", "2")
    convert("--load", tmp_path / "ours", "--save", tmp_path / "ours-ep4", "--target-ep", "4", "--format", "safetensors")
    original = _hf_tensors(folder)
    for source in ("ours", "ours-ep4"):
        out = tmp_path / f"back-{source}"
        convert("--load", tmp_path / source, "--to-hf", out, "--max-shard-size", "30KB")
        assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
        back = _hf_tensors(str(out))
        assert back.keys() == original.keys()
        for name, tensor in original.items():
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
        config = json.loads((out / "config.json").read_text())
        for key, value in json.loads((tmp_path / "hf" / "config.json").read_text()).items():
            if key not in ("transformers_version", "dtype"):
                assert config[key] == value, key
    if activation == "relu":  # Hugging Face's own class reads the exported folder as it reads the original
        # (the same tensors at other file offsets: the kernels' memory alignment moves the last bit)
        load = transformers.SwitchTransformersForConditionalGeneration.from_pretrained
        data = batch(seed=4)
        torch.testing.assert_close(hf_logits(load(str(tmp_path / "back-ours")).eval(), data),
                                   hf_logits(load(folder).eval(), data), rtol=1e-6, atol=1e-6)


def test_bfloat16_folder_with_float32_routers_round_trips(tmp_path, capsys):
    """A bfloat16 model saved after one forward pass holds float32 routers (Hugging Face's router casts its
    classifier to router_dtype when it first runs): it imports, exports with each tensor's dtype bit for bit,
    and the imported checkpoint in a float32 model gives Hugging Face's float32 logits. Another dtype beside
    the model's is still refused by name."""
    hf = hf_switch(4, 2, True, "relu", seed=7).to(torch.bfloat16)
    data = batch(seed=8)
    hf_logits(hf, data)  # the forward pass that leaves the routers in float32
    folder = save_hf(hf, tmp_path / "hf")
    original = _hf_tensors(folder)
    assert {t.dtype for n, t in original.items() if "router" in n} == {torch.float32}
    assert {t.dtype for n, t in original.items() if "router" not in n} == {torch.bfloat16}
    convert("--from-hf", folder, "--save", tmp_path / "ours", "--target-ep", "2")
    convert("--load", tmp_path / "ours", "--to-hf", tmp_path / "back")
    back = _hf_tensors(str(tmp_path / "back"))
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    want = hf_logits(hf.float(), data)  # bfloat16 values are exact in float32
    spawn(_load_and_compare, 2, 1, 2, dropless(HuggingFaceReader(folder).settings), str(tmp_path / "ours"), data, want)

    odd = hf_switch(4, 2, True, "relu", seed=7).to(torch.bfloat16)
    odd.encoder.block[1].layer[1].mlp.experts["expert_0"].to(torch.float16)
    odd_folder = save_hf(odd, tmp_path / "odd")
    with pytest.raises(SystemExit):
        convert("--from-hf", odd_folder, "--save", tmp_path / "odd-ours")
    assert "dtypes ['torch.bfloat16', 'torch.float16']: one floating-point dtype is needed" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "odd-ours")


def test_fine_tuning_from_an_imported_model_learns_and_exports(tmp_path):
    """Import (vocabulary 358: the byte-level tokenizer's 258 and T5's 100 sentinels) at EP=2, train with the
    flags convert wrote, export the fine-tuned checkpoint: Hugging Face loads it, and it is the trained model."""
    hf = hf_switch(2, 2, True, "relu", vocab=358, seed=6)
    folder = save_hf(hf, tmp_path / "hf", shard="200KB")
    convert("--from-hf", folder, "--save", tmp_path / "imported", "--target-ep", "2")
    command = shlex.split((tmp_path / "imported" / TRAIN_FLAGS).read_text().splitlines()[-1])
    proc = run_train([*command[2:], "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
                      "--train-iters", "16", "--lr", "1e-2", "--log-interval", "1", "--eval-iters", "1",
                      "--eval-interval", "16", "--save", str(tmp_path / "tuned")], tmp_path)
    assert "loaded checkpoint" in proc.stdout and "no optimizer state" in proc.stdout
    m = metrics(tmp_path / "tuned" / "plots")
    assert [r["iteration"] for r in m] == list(range(1, 17))
    assert m[-1]["lm_loss"] < m[0]["lm_loss"] - 0.5
    convert("--load", tmp_path / "tuned", "--to-hf", tmp_path / "exported")
    tuned = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(str(tmp_path / "exported"))
    assert tuned.config.vocab_size == 358  # the imported model's vocabulary, not Megatron's padded 384
    moved = [n for n, p in tuned.state_dict().items() if not torch.equal(p, hf.state_dict()[n])]
    assert any("router" in n for n in moved) and any("expert_" in n for n in moved)


def _corrupt_index(folder, edit):
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as f:
        data = json.load(f)
    edit(data)
    with open(index, "w") as f:
        json.dump(data, f)


def _truncate_a_shard(folder):
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[1]
    path = os.path.join(folder, shard)
    os.truncate(path, os.path.getsize(path) - 100)


def _set_config(**fields):
    def edit(folder):
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            config = json.load(f)
        config.update(fields)
        with open(path, "w") as f:
            json.dump(config, f)
    return edit


def _drop_missing_file(folder):
    first = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(folder, first))


BAD = {
    "router-bias": (_set_config(router_bias=True), [], "router_bias is true: the Switch router has no bias"),
    "ungated-gelu": (_set_config(dense_act_fn="gelu"), [], "applies dense_act_fn 'gelu' ungated"),
    "more-experts": (_set_config(num_experts=8), [], "config.json does not describe these weights: num_experts is "
                                                     "8, the weights hold 4 experts per sparse layer"),
    "fewer-layers": (_set_config(num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                                 num_sparse_decoder_layers=1), [],
                     "num_layers is 2, the weights hold 4 encoder blocks; num_decoder_layers is 2, the weights hold "
                     "4 decoder blocks"),
    "wider": (_set_config(d_ff=32), [], "the config gives (32, 16)"),
    "truncated-shard": (_truncate_a_shard, [], "is not a complete safetensors file"),
    "index-names-missing-file": (_drop_missing_file, [], "the download is incomplete; fetch the missing shards"),
    "index-disagrees": (lambda f: _corrupt_index(f, lambda d: d["weight_map"].update(
        {"shared.weight": sorted(set(d["weight_map"].values()))[-1]})), [], "does not hold what its index says"),
    "target-ep-does-not-divide": (lambda f: None, ["--target-ep", "3"], "--expert-model-parallel-size"),
    "target-pp": (lambda f: None, ["--target-pp", "2"], "use --target-pp 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_hugging_face_folders_are_named_and_leave_nothing(tmp_path, capsys, case):
    spoil, flags, message = BAD[case]
    folder = save_hf(hf_switch(4, 2, True, "relu", seed=1), tmp_path / "hf")
    spoil(folder)
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as exit_:
        convert("--from-hf", folder, "--save", tmp_path / "out" / "ckpt", *flags)
    assert exit_.value.code == 1
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == []  # no checkpoint, no temporary directory


def test_bad_export_requests_are_named(tmp_path, capsys):
    folder = save_hf(hf_switch(4, 2, True, "relu"), tmp_path / "hf")
    convert("--from-hf", folder, "--save", tmp_path / "ours")
    (tmp_path / "taken").mkdir()
    for args, message in ((["--load", tmp_path / "ours", "--to-hf", tmp_path / "taken"], "already exists"),
                          (["--load", tmp_path / "ours", "--to-hf", tmp_path / "x", "--target-ep", "2"],
                           "a Hugging Face folder has no layout): drop --target-ep"),
                          (["--from-hf", folder, "--to-hf", tmp_path / "x"], "give one of them"),
                          (["--from-hf", folder, "--save", tmp_path / "ours"], "already exists")):
        with pytest.raises(SystemExit):
            convert(*args)
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_checkpoint_names_are_the_models_sharded_keys(single_process_groups, tmp_path):
    """What the reader presents is exactly what megatron's T5 saves and loads: its sharded state dict's keys."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from megatron_switch.checkpoint.sharding import model_metadata

    for layers, interval, tied, activation in ((4, 2, True, "relu"), (3, 1, False, "gated-gelu")):
        folder = save_hf(hf_switch(layers, interval, tied, activation), tmp_path / f"hf-{layers}-{tied}")
        reader = HuggingFaceReader(folder)
        model = build_switch_t5(reader.settings)
        sharded = list(nested_values(model.sharded_state_dict(metadata=model_metadata())))
        tensors = {s.key for s in sharded if not isinstance(s, ShardedObject)}
        objects = {s.key for s in sharded if isinstance(s, ShardedObject)}
        assert set(reader.tensors) == tensors and set(reader.objects) == objects
        reader.close()
