"""`megatron-switch convert --from-hf` and `--to-hf`: Hugging Face Switch T5 folders <-> our checkpoints.

Importing (`import_huggingface`): `HuggingFaceReader` presents a Hugging Face model folder as a
Switch T5 checkpoint of ours (torch_dist keys, iteration 0, no optimizer or schedule state),
reading the folder's tensors one at a time as each block of ours is asked for (an expert bank's
block reads only its experts' tensors); `convert.write_converted` then lays it out at the target
TP x EP, checks every tensor against a manifest and renames the directory into place. The
original config.json is kept in the checkpoint's common state (`huggingface_config`), and the
`megatron-switch train` flags that load the result are written beside it (TRAIN_FLAGS) and printed.

Exporting (`export_huggingface`): any checkpoint of a Switch T5 (any format, any layout) ->
a folder that `SwitchTransformersForConditionalGeneration.from_pretrained` loads: config.json,
and the weights as safetensors shards of at most `max_shard_bytes` with
`model.safetensors.index.json` (one `model.safetensors` when they fit), under Hugging Face's
names, as `save_pretrained` writes them (tied: `shared.weight` only). Each shard is written tensor
by tensor, then reread and checked against the SHA-256 of what was meant to be written; the
folder is written under a temporary name and renamed when complete. Megatron's padded vocabulary
rows are cut back to the Hugging Face vocabulary (the imported config's, else the padded size).

What the trainer cannot honour of a Hugging Face config is refused by name (`check_hf_config`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from megatron_switch.checkpoint.contents import (
    CheckpointReader,
    ConvertError,
    Index,
    TensorSpec,
    block,
    checksum,
    is_optimizer,
    row_blocks,
)
from megatron_switch.checkpoint.huggingface import SAFETENSORS, HuggingFaceFolder, WeightMappingError, model_file
from megatron_switch.checkpoint.huggingface_t5 import (
    EMBEDDING,
    HF_INPUT_EMBEDDINGS,
    OUTPUT,
    OUTPUT_ALIAS,
    T5WeightsError,
    checkpoint_name,
    entries,
    extra_state_names,
    hf_config_of,
    hf_shapes,
    settings_from_hf_config,
    settings_from_model_config,
    state_dict_name,
)
from megatron_switch.checkpoint.layout import read_small_file
from megatron_switch.checkpoint.pipeline import (
    check_new_directory,
    check_target_flags,
    open_checkpoint,
    sync_tree,
    target_layout,
    write_converted,
)
from megatron_switch.parallel import padded_vocab_size
from megatron_switch.specs.t5_model import STACKS, T5ConfigError, T5Settings, t5_description

CONFIG = "config.json"
TRAIN_FLAGS = "train-flags.txt"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")
LAYER_NORM_EPSILON = 1e-6  # the trainer's T5 (T5Settings' default)
CONFIG_LIMIT = 1 << 20  # a config.json holds a few dozen fields (Switch-C's: 2 KB)
ROUTER_SUFFIX = ".mlp.router.classifier.weight"


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise ConvertError(f"--from-hf {folder}: no {CONFIG}: not a Hugging Face model folder (save_pretrained "
                           f"writes one)")
    try:
        config = json.loads(read_small_file(model_file(folder, CONFIG, f"{folder}: the config"), CONFIG_LIMIT,
                                            "a model config"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise ConvertError(f"{path} is not a readable config ({err})") from None
    return config


def check_hf_config(config: Mapping, where: str) -> None:
    """ConvertError naming every field of a Hugging Face Switch config that megatron-switch's T5
    (and its trainer) cannot honour, and what would."""
    problems = []
    if config.get("model_type") != "switch_transformers":
        problems.append(f"model_type is {config.get('model_type')!r}: only Switch Transformers "
                        "(model_type 'switch_transformers') convert")
    if config.get("is_encoder_decoder", True) is not True:
        problems.append("is_encoder_decoder is false: Switch T5 is an encoder-decoder")
    if config.get("router_bias"):
        problems.append("router_bias is true: the Switch router has no bias")
    if config.get("router_ignore_padding_tokens"):
        problems.append("router_ignore_padding_tokens is true: the router routes every token")
    epsilon = config.get("layer_norm_epsilon", LAYER_NORM_EPSILON)
    if epsilon != LAYER_NORM_EPSILON:
        problems.append(f"layer_norm_epsilon is {epsilon}: the trainer's T5 norms use {LAYER_NORM_EPSILON}")
    for key in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            problems.append(f"{key} is {config.get(key)!r}: a positive integer is needed")
    if problems:
        raise ConvertError(f"{where}: cannot convert this model: " + "; ".join(problems))


def layer_and_expert_numbers(names, layer: str) -> dict[str, set[int]]:
    """{"encoder", "decoder": the layer numbers, "experts": the expert numbers} that tensor `names`
    hold, with `layer` the word between stack and number ("block" in Hugging Face's names, "layers"
    in ours); Hugging Face names each expert (`experts.expert_J.`), we stack them on axis 0."""
    found: dict[str, set[int]] = {"encoder": set(), "decoder": set(), "experts": set()}
    pattern = re.compile(rf"^(encoder|decoder)\.{layer}\.(\d+)\.(?:.*\.experts\.expert_(\d+)\.)?")
    for name in names:
        match = pattern.match(name)
        if match:
            found[match.group(1)].add(int(match.group(2)))
            if match.group(3) is not None:
                found["experts"].add(int(match.group(3)))
    return found


def check_counts(where: str, counts: list[tuple[str, Any, int, str]], fix: str) -> None:
    """ConvertError naming every (field, value, count, what) whose recorded `value` is not the `count`
    the tensors hold: a config's layer and expert counts are checked against the weights before
    any list of names is built from them (a config of 10^9 experts would build 10^9 names)."""
    wrong = [f"{field} is {value!r}, the weights hold {count} {what}" for field, value, count, what in counts
             if type(value) is not int or value != count]
    if wrong:
        raise ConvertError(f"{where} does not describe these weights: {'; '.join(wrong)}. {fix}")


def check_hf_counts(config: Mapping, specs: Mapping[str, TensorSpec], where: str) -> None:
    """The layer, sparse-layer and expert counts of Hugging Face config `config` against the tensors
    of its folder (`specs`): ConvertError naming each field that disagrees (`check_counts`)."""
    found = layer_and_expert_numbers(specs, "block")
    decoder_field = "num_decoder_layers" if config.get("num_decoder_layers") else "num_layers"
    counts = [("num_layers", config.get("num_layers"), len(found["encoder"]), "encoder blocks"),
              (decoder_field, config.get(decoder_field), len(found["decoder"]), "decoder blocks")]
    for stack, field in (("encoder", "num_layers"), ("decoder", decoder_field)):
        sparse = config.get(f"num_sparse_{stack}_layers")
        if sparse is not None and (type(sparse) is not int or not 0 <= sparse <= len(found[stack])):
            counts.append((f"num_sparse_{stack}_layers", sparse, len(found[stack]), f"{stack} blocks, at most that "
                           "many sparse"))
    if config.get("num_sparse_encoder_layers") or config.get("num_sparse_decoder_layers") or found["experts"]:
        counts.append(("num_experts", config.get("num_experts"), len(found["experts"]), "experts per sparse layer"))
    check_counts(where, counts, "Use the config.json that came with these weights")


def check_model_counts(model_config: Mapping, reader: CheckpointReader, where: str) -> None:
    """The encoder and decoder layer counts and the expert count a Switch T5 checkpoint's
    `model_config` records, against its tensors (`check_counts`)."""
    model = [name for name in reader.tensors if not is_optimizer(name)]
    found = layer_and_expert_numbers(model, "layers")
    banks = {reader.tensors[name].shape[0] for name in model if ".mlp.experts." in name}
    counts = [("encoder_num_layers", model_config.get("encoder_num_layers"), len(found["encoder"]), "encoder layers"),
              ("decoder_num_layers", model_config.get("decoder_num_layers"), len(found["decoder"]), "decoder layers")]
    if model_config.get("num_experts") or banks:
        counts.append(("num_experts", model_config.get("num_experts"), max(banks, default=0), "experts per bank"))
    check_counts(where, counts, "The record was edited, or belongs to another model")


def _description(settings: T5Settings) -> dict:
    """The model_config a `megatron-switch train --model t5` checkpoint of `settings` records: the
    shared fields `training.checkpointing.model_description` writes, and the encoder-decoder's."""
    config = {"num_layers": settings.decoder_layers, "hidden_size": settings.d_model,
              "num_attention_heads": settings.num_heads, "ffn_hidden_size": settings.d_ff,
              "gated_linear_unit": settings.activation == "gated-gelu", "padded_vocab_size": settings.vocab_size,
              **t5_description(settings)}
    if settings.switch is not None:
        config.update(num_experts=settings.switch.num_experts, expert_interval=settings.switch.expert_interval)
    return config


def hf_settings(config: Mapping, folder: str, tp: int = 1, divisible_by: int = 128) -> T5Settings:
    """The T5Settings `--from-hf` imports a Hugging Face config as (of a folder `folder`, for the
    messages), the vocabulary padded as the trainer will at `tp`; ConvertError naming what the trainer
    cannot honour."""
    check_hf_config(config, folder)
    rows = padded_vocab_size(int(config["vocab_size"]), divisible_by, tp)
    try:
        settings = settings_from_hf_config(config, vocab_size=rows)
    except (T5ConfigError, ValueError, TypeError) as err:
        raise ConvertError(f"{folder}/{CONFIG}: {err}") from None
    intervals = {settings.expert_interval(stack) for stack in STACKS} - {0}
    if len(intervals) > 1:
        raise ConvertError(f"{folder}/{CONFIG} puts Switch layers at different steps in the encoder and the "
                           f"decoder ({settings.expert_interval('encoder')} and "
                           f"{settings.expert_interval('decoder')}): the trainer's --moe-layer-freq is one "
                           "step for both stacks")
    return settings


def checkpoint_specs(settings: T5Settings, hf_specs: Mapping[str, TensorSpec], rows: int) -> dict[str, TensorSpec]:
    """Our checkpoint's tensors (torch_dist keys) made of Hugging Face tensors of `hf_specs` (name ->
    shape and dtype, as `hf_shapes` gives them for `settings`); `rows`: our padded vocabulary."""
    specs = {}
    for entry in entries(settings):
        joined = entry.join([torch.empty(hf_specs[key].shape, dtype=hf_specs[key].dtype, device="meta")
                             for key in entry.hf])
        specs[checkpoint_name(entry.ours)] = TensorSpec(tuple(joined.shape), joined.dtype)
    embedding = hf_specs["shared.weight"]
    specs[EMBEDDING] = TensorSpec((rows, embedding.shape[1]), embedding.dtype)
    if not settings.tie_word_embeddings:
        specs[OUTPUT] = specs[OUTPUT_ALIAS] = specs[EMBEDDING]
    return specs


class HuggingFaceReader(CheckpointReader):
    """A Hugging Face Switch T5 folder seen as our checkpoint (see the module docstring).

    `tp` and `divisible_by` pad the vocabulary as the trainer will (`--make-vocab-size-divisible-by`
    at that TP); `trusted`: a pytorch_model*.bin's pickle is read without the allow-list."""

    format_name = "huggingface"

    def __init__(self, folder: str, *, tp: int = 1, divisible_by: int = 128, trusted: bool = False):
        super().__init__(folder, trusted=trusted)
        self.config = read_hf_config(folder)
        check_hf_config(self.config, folder)
        try:  # the files' headers first: the config's counts are checked against them (`check_hf_counts`)
            self.folder = HuggingFaceFolder(folder, trusted=trusted)
        except WeightMappingError as err:
            raise ConvertError(str(err)) from None
        check_hf_counts(self.config, self.folder.specs, f"{folder}/{CONFIG}")
        self.hf_vocab_size = int(self.config.get("vocab_size") or 0)
        self.settings = hf_settings(self.config, folder, tp, divisible_by)
        rows = self.settings.vocab_size
        self._check_keys()
        self._entries = {checkpoint_name(entry.ours): entry for entry in entries(self.settings)}
        self.tensors.update(checkpoint_specs(self.settings, self.folder.specs, rows))
        self.objects = dict.fromkeys(extra_state_names(self.settings))
        self._embeddings_checked = False
        self.common = {"iteration": 0, "consumed_train_samples": 0, "layout": {"tp": 1, "pp": 1, "ep": 1},
                       "model_config": _description(self.settings),
                       "huggingface_config": json.loads(json.dumps(self.config))}

    def _check_keys(self) -> None:
        expected = hf_shapes(self.settings, self.hf_vocab_size)
        found = self.folder.specs
        optional = () if not self.settings.tie_word_embeddings else (*HF_INPUT_EMBEDDINGS[1:], "lm_head.weight")
        missing = sorted(k for k in expected if k not in found and k not in HF_INPUT_EMBEDDINGS[1:])
        extra = sorted(k for k in found if k not in expected and k not in optional)
        where = f"{self.path}: the weights do not match {CONFIG}"
        if missing or extra:
            raise ConvertError(f"{where}: " + "; ".join(
                f"{what} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
                for what, keys in (("missing", missing), ("unexpected", extra)) if keys)
                + " (check num_layers, num_decoder_layers, the sparse steps, num_experts and feed_forward_proj)")
        for key, spec in found.items():
            if key in expected and spec.shape != expected[key]:
                raise ConvertError(f"{where}: {key} has shape {spec.shape}, the config gives {expected[key]} "
                                   "(d_model, d_kv x num_heads, d_ff, num_experts, vocab_size)")
        # One floating-point dtype, but a router may be float32 beside it: Hugging Face's router casts its
        # classifier to router_dtype (float32) at its first forward pass, so a bfloat16 model saved after one
        # holds exactly that mix; megatron-switch keeps routers in float32 too.
        dtypes = {spec.dtype for key, spec in found.items() if not key.endswith(ROUTER_SUFFIX)}
        routers = {spec.dtype for key, spec in found.items() if key.endswith(ROUTER_SUFFIX)} - {torch.float32}
        if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point or not routers <= dtypes:
            raise ConvertError(f"{where}: the tensors have dtypes {sorted(map(str, dtypes | routers))}: one "
                               "floating-point dtype is needed (the routers may be float32 beside it)")

    def _check_embeddings(self) -> None:
        """The stacks' input embeddings (and a tied output layer), when the folder has them, equal `shared`."""
        tied = ("lm_head.weight",) if self.settings.tie_word_embeddings else ()
        spec = TensorSpec(self.folder.specs["shared.weight"].shape, self.folder.specs["shared.weight"].dtype)
        for key in (*HF_INPUT_EMBEDDINGS[1:], *tied):
            if key in self.folder.specs and not all(
                    torch.equal(self.folder.read(key, index[0]), self.folder.read("shared.weight", index[0]))
                    for index in row_blocks(spec)):
                raise ConvertError(f"{self.path}: {key} differs from shared.weight: megatron's T5 has one input "
                                   "embedding for both stacks" + (", tied to the output layer (config.json "
                                                                  "tie_word_embeddings)" if tied else ""))
        self._embeddings_checked = True

    def _vocabulary_rows(self, key: str, index: Index) -> torch.Tensor:
        """Block `index` of our padded vocabulary matrix made of Hugging Face's `key`: its rows, then zeros."""
        (first, last), rows = index[0], self.hf_vocab_size
        part = self.folder.read(key, (min(first, rows), min(last, rows)))
        part = torch.cat([part, part.new_zeros(last - first - part.shape[0], *part.shape[1:])])
        return block(part, index, (first, *[0] * (part.dim() - 1))).contiguous()

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        spec = self.tensors[name]
        index = index or tuple((0, n) for n in spec.shape)
        if name in (EMBEDDING, OUTPUT, OUTPUT_ALIAS):
            if not self._embeddings_checked:
                self._check_embeddings()
            return self._vocabulary_rows("shared.weight" if name == EMBEDDING else "lm_head.weight", index)
        entry = self._entries[name]
        if entry.per_expert:  # only the experts asked for
            (first, last), width = index[0], entry.per_expert
            joined = entry.join([self.folder.read(key) for key in entry.hf[first * width:last * width]])
            return block(joined, index, (first, *[0] * (joined.dim() - 1))).contiguous()
        return block(entry.join([self.folder.read(key) for key in entry.hf]), index).contiguous()

    def close(self) -> None:
        if isinstance(getattr(self, "folder", None), HuggingFaceFolder):
            self.folder.close()


def train_flags(settings: T5Settings, config: Mapping, layout, divisible_by: int, save: str,
                tokenizer: str | None) -> list[str]:
    """The `megatron-switch train` flags of the imported model, its layout and checkpoint."""
    flags = ["--model", "t5", "--num-layers", settings.decoder_layers, "--encoder-num-layers",
             settings.encoder_layers, "--decoder-num-layers", settings.decoder_layers, "--hidden-size",
             settings.d_model, "--num-attention-heads", settings.num_heads, "--kv-channels", settings.d_kv,
             "--ffn-hidden-size", settings.d_ff, "--feed-forward-proj", settings.activation,
             "--relative-attention-num-buckets", settings.relative_attention_num_buckets,
             "--relative-attention-max-distance", settings.relative_attention_max_distance,
             "--hidden-dropout", settings.dropout, "--attention-dropout", settings.dropout,
             "--make-vocab-size-divisible-by", divisible_by]
    if not settings.tie_word_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    if settings.switch is not None:
        flags += ["--moe-switch", "--num-experts", settings.switch.num_experts, "--moe-layer-freq",
                  settings.switch.expert_interval]
        for flag, key in (("--moe-aux-loss-coeff", "router_aux_loss_coef"),
                          ("--moe-z-loss-coeff", "router_z_loss_coef"),
                          ("--moe-input-jitter-eps", "router_jitter_noise")):
            if config.get(key) is not None:
                flags += [flag, config[key]]
    flags += ["--tensor-model-parallel-size", layout.tp, "--expert-model-parallel-size", layout.ep,
              "--nproc-per-node", layout.tp * layout.ep]
    if tokenizer is not None:
        flags += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer]
    return ["megatron-switch", "train", *map(str, flags), "--load", save]


def _tokenizer_of(folder: str) -> str | None:
    found = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]
    return os.path.abspath(folder) if any(f in found for f in ("tokenizer.json", "spiece.model")) else None


def import_huggingface(folder: str, save: str, target_tp: int | None = None, target_pp: int | None = None,
                       target_ep: int | None = None, fmt: str | None = None, divisible_by: int = 128,
                       progress: bool = True, log=print, trust_checkpoint_code: bool = False) -> list[str]:
    """`convert --from-hf`: the Hugging Face folder as a new checkpoint `save` at the target layout.
    Returns the train command that loads it (also written to `save`/TRAIN_FLAGS and logged)."""

    save = check_new_directory(save, "--save")
    check_target_flags(target_tp, target_pp, target_ep, fmt)
    if fmt == "torch":
        raise ConvertError("--format torch with --from-hf: Megatron-LM's legacy files have no T5 layout here; use "
                           "torch_dist (the default) or safetensors")
    if not os.path.isdir(folder):
        raise ConvertError(f"--from-hf {folder}: no such directory")
    if divisible_by < 1:
        raise ConvertError(f"--make-vocab-size-divisible-by must be >= 1, got {divisible_by}")
    reader = HuggingFaceReader(folder, tp=target_tp or 1, divisible_by=divisible_by, trusted=trust_checkpoint_code)
    try:
        layout = target_layout(reader, target_tp, target_pp, target_ep)
        tokenizer = _tokenizer_of(folder)
        command = train_flags(reader.settings, reader.config, layout, divisible_by, save, tokenizer)
        note = ("# Fine-tune the imported model: these flags build it at the converted layout and load it.\n"
                "# Add data (--data-path), schedule (--train-iters, --lr, ...) and --save flags; the Switch\n"
                "# layers use megatron-switch's capacity factor, not Hugging Face's expert_capacity.\n")
        if tokenizer is None:
            note += (f"# {folder} has no tokenizer: pass the one the model was trained with (--tokenizer-type\n"
                     "# HuggingFaceTokenizer --tokenizer-model DIR), or the byte-level default.\n")
        write_converted(reader, save, target_tp, target_pp, target_ep, fmt or "torch_dist", progress=progress,
                        log=log, extra_files={TRAIN_FLAGS: note + shlex.join(command) + "\n"})
    finally:
        reader.close()
    log(f" to fine-tune it ({os.path.join(save, TRAIN_FLAGS)}):\n   {shlex.join(command)}")
    return command


# --- export ---------------------------------------------------------------------------------------------------


class ExportSource:
    """Our tensors of a checkpoint, by state-dict name: a whole tensor, or one expert of a bank read
    with its neighbours in a block of at most BLOCK_BYTES (a stored chunk is read once, not once per
    expert). The last block read is kept: an entry's Hugging Face tensors are produced in turn from it."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self._key: tuple | None = None
        self._block: torch.Tensor | None = None

    def read(self, name: str, expert: int | None = None) -> torch.Tensor:
        stored = checkpoint_name(name)
        if stored not in self.reader.tensors:
            raise ConvertError(f"{self.reader.path} has no {stored}: not a checkpoint of the Switch T5 its "
                               "model_config describes")
        spec = self.reader.tensors[stored]
        if expert is None:
            index = None
        else:
            index = next(i for i in row_blocks(spec) if i[0][0] <= expert < i[0][1])
        if self._key != (name, index):
            self._key, self._block = None, None  # (the previous block goes before the next is read)
            self._key, self._block = (name, index), self.reader.read(stored, index)
        return self._block if expert is None else self._block[expert - index[0][0]:expert - index[0][0] + 1]


def export_plan(settings: T5Settings, source: ExportSource, hf_vocab_size: int) -> list[tuple[str, TensorSpec, Any]]:
    """(Hugging Face name, spec, produce) of every tensor of the exported folder, in file order."""
    vocab_dtype = source.reader.tensors[EMBEDDING].dtype
    plan = []

    def vocab(name: str, ours: str):
        width = source.reader.tensors[checkpoint_name(ours)].shape[1]
        plan.append((name, TensorSpec((hf_vocab_size, width), vocab_dtype),
                     lambda: source.read(ours)[:hf_vocab_size].contiguous()))

    vocab("shared.weight", EMBEDDING)
    if not settings.tie_word_embeddings:
        for name in HF_INPUT_EMBEDDINGS[1:]:
            vocab(name, EMBEDDING)
    for entry in entries(settings):
        spec = source.reader.tensors[checkpoint_name(entry.ours)]
        if entry.per_expert:
            for j in range(spec.shape[0]):
                names = entry.hf[j * entry.per_expert:(j + 1) * entry.per_expert]
                for k, name in enumerate(names):
                    one = entry.split(torch.empty((1, *spec.shape[1:]), dtype=spec.dtype, device="meta"))[k]
                    plan.append((name, TensorSpec(tuple(one.shape), spec.dtype),
                                 lambda e=entry, j=j, k=k: e.split(source.read(e.ours, j))[k].contiguous()))
        else:
            parts = entry.split(torch.empty(spec.shape, dtype=spec.dtype, device="meta"))
            for k, (name, part) in enumerate(zip(entry.hf, parts)):
                plan.append((name, TensorSpec(tuple(part.shape), spec.dtype),
                             lambda e=entry, k=k: e.split(source.read(e.ours))[k].contiguous()))
    if not settings.tie_word_embeddings:
        vocab("lm_head.weight", OUTPUT)
    return plan


def _shards(plan: list, max_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item[1].nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[1].nbytes
    return shards


def export_huggingface(load: str, out: str, max_shard_bytes: int = 5 * 10**9, progress: bool = True,
                       log=print, trust_checkpoint_code: bool = False) -> dict[str, str]:
    """`convert --to-hf`: the Switch T5 checkpoint at `load` as a new Hugging Face folder `out`.
    Returns {Hugging Face name: SHA-256} of what was written (and checked)."""
    from tqdm import tqdm

    from megatron_switch.checkpoint.consolidated import write_safetensors_file

    out = check_new_directory(out, "--to-hf")
    if max_shard_bytes < 1:
        raise ConvertError(f"--max-shard-size must be positive, got {max_shard_bytes}")
    reader = open_checkpoint(load, trusted=trust_checkpoint_code)
    try:
        model_config = reader.common.get("model_config") or {}
        try:
            settings = settings_from_model_config(model_config, tied=OUTPUT not in reader.tensors)
            check_model_counts(model_config, reader, f"--load {load}: its model_config")
            imported = reader.common.get("huggingface_config")
            hf_vocab_size = int(imported["vocab_size"]) if imported else settings.vocab_size
            config = hf_config_of(settings, hf_vocab_size, imported)
        except (T5ConfigError, T5WeightsError, KeyError, TypeError, ValueError) as err:
            raise ConvertError(f"--load {load}: {err}") from None
        experts = {state_dict_name(n) for n in reader.tensors if ".mlp.experts." in n and not is_optimizer(n)}
        expected = {e.ours for e in entries(settings) if e.per_expert}
        if experts != expected:
            raise ConvertError(f"--load {load}: its expert banks ({sorted(experts)[:2]} ...) are not where its "
                               f"model_config puts Switch layers ({sorted(expected)[:2]} ...)")
        plan = export_plan(settings, ExportSource(reader), hf_vocab_size)
        shards = _shards(plan, max_shard_bytes)
        names = ([SAFETENSORS] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        total = sum(spec.nbytes for _, spec, _ in plan)
        log(f" exporting {reader.format_name} {load} -> Hugging Face {out}: {len(plan)} tensors, "
            f"{total / 2**20:.1f} MiB in {len(shards)} file(s)")
        parent = os.path.dirname(out)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp.", dir=parent)
        try:
            written = os.path.join(tmp, "data")
            os.makedirs(written)
            digests: dict[str, str] = {}

            def hashed(name, produce):
                def run():
                    tensor = produce()
                    digests[name] = checksum(tensor)
                    return tensor
                return run

            with tqdm(total=total, desc="writing Hugging Face shards", unit="B", unit_scale=True,
                      disable=not progress, leave=False) as bar:
                for file, shard in zip(names, shards):
                    write_safetensors_file(os.path.join(written, file),
                                           [(n, spec, hashed(n, produce)) for n, spec, produce in shard], bar)
            if len(shards) > 1:
                index = {"metadata": {"total_size": total},
                         "weight_map": {n: file for file, shard in zip(names, shards) for n, _, _ in shard}}
                with open(os.path.join(written, SAFETENSORS + ".index.json"), "w") as f:
                    json.dump(index, f, indent=2, sort_keys=True)
            with open(os.path.join(written, CONFIG), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
            _check_written(written, digests)
            sync_tree(written)
            os.rename(written, out)
            sync_tree(parent, recursive=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        reader.close()
    log(f" wrote {out}: {len(digests)} tensors, each reread and checked")
    return digests


def _check_written(folder: str, digests: dict[str, str]) -> None:
    """Reread every tensor of the written folder and compare it with what was meant to be written."""
    written = HuggingFaceFolder(folder)
    try:
        if set(written.specs) != set(digests):
            raise ConvertError(f"{folder}: the written shards hold {len(written.specs)} tensors, {len(digests)} were "
                               "written")
        for name, digest in digests.items():
            if checksum(written.read(name)) != digest:
                raise ConvertError(f"{folder}: {name} reads back differently from what was written: the disk "
                                   "or filesystem corrupted it; export again")
    finally:
        written.close()
