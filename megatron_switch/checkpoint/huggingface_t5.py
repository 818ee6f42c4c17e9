"""Switch T5 <-> Hugging Face's `SwitchTransformersForConditionalGeneration`: configs and weights.

The one place that knows how the two name and lay out the same model. Pure functions over configs
and full, one-process tensors (every expert, no tensor-parallel split; `specs.t5_model.local_state_dict` cuts a
full state dict to a rank's experts).

Ours <- Hugging Face, for stack S (encoder, decoder), layer i (0-based in both), FFN sublayer F
(`layer.1` in the encoder, `layer.2` in the decoder):
  embedding.word_embeddings.weight                  <- shared.weight (= S.embed_tokens.weight)
  S_relative_pos_emb.relative_attention_bias.weight <- S.block.0.layer.0.SelfAttention.relative_attention_bias.weight
  S.layers.i.input_layernorm.weight                 <- S.block.i.layer.0.layer_norm.weight
  S.layers.i.self_attention.linear_qkv.weight       <- S.block.i.layer.0.SelfAttention.{q,k,v}.weight, fused per head
  S.layers.i.self_attention.linear_proj.weight      <- S.block.i.layer.0.SelfAttention.o.weight
  decoder.layers.i.pre_cross_attn_layernorm.weight  <- decoder.block.i.layer.1.layer_norm.weight
  decoder.layers.i.cross_attention.linear_q.weight  <- decoder.block.i.layer.1.EncDecAttention.q.weight
  decoder.layers.i.cross_attention.linear_kv.weight <- ...EncDecAttention.{k,v}.weight, fused per head
  decoder.layers.i.cross_attention.linear_proj.weight <- ...EncDecAttention.o.weight
  S.layers.i.pre_mlp_layernorm.weight               <- S.block.i.F.layer_norm.weight
  dense:  S.layers.i.mlp.linear_fc1.weight [f', h]  <- F.mlp.wi.weight (gated: [wi_0; wi_1])
          S.layers.i.mlp.linear_fc2.weight [h, f]   <- F.mlp.wo.weight
  Switch: S.layers.i.mlp.router.weight [E, h]       <- F.mlp.router.classifier.weight
          S.layers.i.mlp.experts.weight1 [E, f', h] <- F.mlp.experts.expert_j.wi.weight (gated: [wi_0; wi_1]), stacked
          S.layers.i.mlp.experts.weight2 [E, h, f]  <- F.mlp.experts.expert_j.wo.weight, stacked
  S.final_layernorm.weight                          <- S.final_layer_norm.weight
  lm_head.output_layer.weight (and its alias output_layer.weight) <- lm_head.weight (untied only; tied: the
                                                       shared embedding)
Layouts: both use nn.Linear's [out, in]. megatron fuses self-attention q, k, v per head (rows
[q_h; k_h; v_h] of d_kv each, head after head) and cross-attention k, v per head ([k_h; v_h]).
Gated FFNs: Hugging Face's SwitchTransformers has none (its `dense_act_fn` is applied ungated and
"gated-gelu" is not an activation it knows); the names are T5 v1.1's `T5DenseGatedActDense`
(wi_0: the GELU gate, wi_1: linear), as in checkpoint/huggingface.py.
Hugging Face 5.24 unties the encoder's and decoder's input embeddings from `shared` when
`tie_word_embeddings=False`; megatron's T5 (and T5X) share one input embedding: importing needs
them equal, exporting writes the same tensor to all three.

Configs: Hugging Face puts sparse layers at 0-based i with i % sparse_step == 1 (every layer for
step 1), ours at 1-based k, 2k, ...: the same sets for k = 1 and 2 (all released checkpoints), and
`settings_from_hf_config` refuses placements that have no k. Router loss coefficients map one to
one, though the losses aggregate differently: Hugging Face averages each stack's losses over its
sparse layers (and takes load fractions per sequence), ours add one loss per Switch layer over the
micro-batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from megatron_switch.config import SwitchConfig
from megatron_switch.specs.t5_model import FFN_ACTIVATIONS, STACKS, T5ConfigError, T5Settings


class T5WeightsError(ValueError):
    """Weights that do not fit the T5 settings; the message names the key and what was expected."""


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Separate [n*d, h] q, k, v -> megatron's linear_qkv [3*n*d, h]: per head, rows [q_h; k_h; v_h]."""
    return torch.stack([t.reshape(num_heads, -1, t.shape[-1]) for t in (q, k, v)], dim=1).reshape(-1, q.shape[-1])


def split_qkv(qkv: torch.Tensor, num_heads: int) -> List[torch.Tensor]:
    """megatron's linear_qkv [3*n*d, h] -> [q, k, v], each [n*d, h]."""
    per_head = qkv.reshape(num_heads, 3, -1, qkv.shape[-1])
    return [per_head[:, j].reshape(-1, qkv.shape[-1]) for j in range(3)]


def fuse_kv(k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Separate [n*d, h] k, v -> megatron's cross-attention linear_kv [2*n*d, h]: per head [k_h; v_h]."""
    return torch.stack([t.reshape(num_heads, -1, t.shape[-1]) for t in (k, v)], dim=1).reshape(-1, k.shape[-1])


def split_kv(kv: torch.Tensor, num_heads: int) -> List[torch.Tensor]:
    """megatron's cross-attention linear_kv [2*n*d, h] -> [k, v], each [n*d, h]."""
    per_head = kv.reshape(num_heads, 2, -1, kv.shape[-1])
    return [per_head[:, j].reshape(-1, kv.shape[-1]) for j in range(2)]


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One of our tensors and the Hugging Face tensors it is made of."""

    ours: str
    hf: Sequence[str]
    join: Callable[[List[torch.Tensor]], torch.Tensor]  # HF tensors (in `hf` order) -> ours
    split: Callable[[torch.Tensor], List[torch.Tensor]]  # ours -> HF tensors (in `hf` order)
    per_expert: int = 0  # an expert bank: `hf` holds this many tensors per expert, expert after expert,
    # and `join` of the tensors of experts [a, b) gives experts [a, b) of the bank


def _same(ours: str, hf: str) -> _Entry:
    return _Entry(ours, (hf,), lambda ts: ts[0], lambda t: [t])


def _ffn_in_names(prefix: str, gated: bool) -> tuple:
    return (f"{prefix}wi_0.weight", f"{prefix}wi_1.weight") if gated else (f"{prefix}wi.weight",)


def _ffn_in(gated: bool):
    """(join, split) of one FFN input projection: gated [wi_0; wi_1] (gate first, as megatron's GLU)."""
    if gated:
        return (lambda ts: torch.cat(ts)), (lambda t: list(t.chunk(2)))
    return (lambda ts: ts[0]), (lambda t: [t])


def _ffn_entries(settings: T5Settings, stack: str, i: int, ours: str, hf: str) -> List[_Entry]:
    gated = settings.activation == "gated-gelu"
    entries = [_same(f"{ours}.pre_mlp_layernorm.weight", f"{hf}.layer_norm.weight")]
    if i + 1 not in settings.switch_layer_numbers(stack):
        join, split = _ffn_in(gated)
        entries += [_Entry(f"{ours}.mlp.linear_fc1.weight", _ffn_in_names(f"{hf}.mlp.", gated), join, split),
                    _same(f"{ours}.mlp.linear_fc2.weight", f"{hf}.mlp.wo.weight")]
        return entries
    experts = settings.switch.num_experts
    width = 2 if gated else 1
    join_one, split_one = _ffn_in(gated)

    def join_bank(ts):
        return torch.stack([join_one(ts[j * width:(j + 1) * width]) for j in range(len(ts) // width)])

    def split_bank(bank):
        return [t for j in range(bank.shape[0]) for t in split_one(bank[j])]

    names = [n for j in range(experts) for n in _ffn_in_names(f"{hf}.mlp.experts.expert_{j}.", gated)]
    entries += [
        _same(f"{ours}.mlp.router.weight", f"{hf}.mlp.router.classifier.weight"),
        _Entry(f"{ours}.mlp.experts.weight1", tuple(names), join_bank, split_bank, width),
        _Entry(f"{ours}.mlp.experts.weight2", tuple(f"{hf}.mlp.experts.expert_{j}.wo.weight" for j in range(experts)),
               torch.stack, lambda bank: list(bank.unbind(0)), 1)]
    return entries


def entries(settings: T5Settings) -> List[_Entry]:
    """Every tensor of ours but the word embedding, with its Hugging Face sources."""
    heads = settings.num_heads
    out = []
    for stack in STACKS:
        out.append(_same(f"{stack}_relative_pos_emb.relative_attention_bias.weight",
                         f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
        for i in range(settings.num_layers(stack)):
            ours, hf = f"{stack}.layers.{i}", f"{stack}.block.{i}.layer"
            attention = f"{hf}.0.SelfAttention"
            out += [
                _same(f"{ours}.input_layernorm.weight", f"{hf}.0.layer_norm.weight"),
                _Entry(f"{ours}.self_attention.linear_qkv.weight",
                       tuple(f"{attention}.{p}.weight" for p in "qkv"),
                       lambda ts: fuse_qkv(*ts, heads), lambda t: split_qkv(t, heads)),
                _same(f"{ours}.self_attention.linear_proj.weight", f"{attention}.o.weight")]
            if stack == "decoder":
                cross = f"{hf}.1.EncDecAttention"
                out += [
                    _same(f"{ours}.pre_cross_attn_layernorm.weight", f"{hf}.1.layer_norm.weight"),
                    _same(f"{ours}.cross_attention.linear_q.weight", f"{cross}.q.weight"),
                    _Entry(f"{ours}.cross_attention.linear_kv.weight", (f"{cross}.k.weight", f"{cross}.v.weight"),
                           lambda ts: fuse_kv(*ts, heads), lambda t: split_kv(t, heads)),
                    _same(f"{ours}.cross_attention.linear_proj.weight", f"{cross}.o.weight")]
            out += _ffn_entries(settings, stack, i, ours, f"{hf}.{2 if stack == 'decoder' else 1}")
        out.append(_same(f"{stack}.final_layernorm.weight", f"{stack}.final_layer_norm.weight"))
    return out


EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "lm_head.output_layer.weight"
OUTPUT_ALIAS = "output_layer.weight"  # T5Model registers its head's output layer a second time
HF_INPUT_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _vocab_rows(tensor: torch.Tensor, rows: int, key: str) -> torch.Tensor:
    """`tensor` [V, h] with `rows` rows: zero rows appended (Megatron's padded vocabulary)."""
    if tensor.shape[0] > rows:
        raise T5WeightsError(f"{key} has {tensor.shape[0]} vocabulary rows, more than T5Settings.vocab_size "
                             f"{rows}: build the settings with vocab_size >= {tensor.shape[0]}")
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def hf_to_ours(hf_state: Mapping[str, torch.Tensor], settings: T5Settings) -> Dict[str, torch.Tensor]:
    """A Hugging Face Switch T5 state dict -> ours (full: every expert), for `SwitchT5Model.load_state_dict`.

    Vocabulary rows beyond Hugging Face's (Megatron's padding) are zeros. Every Hugging Face key must
    be used: a sparse layer where the settings put a dense one (or the reverse) is an error."""
    def take(key: str) -> torch.Tensor:
        if key not in hf_state:
            raise T5WeightsError(f"missing Hugging Face key {key!r} (T5Settings: {settings.encoder_layers}+"
                                 f"{settings.decoder_layers} layers, Switch layers "
                                 f"{settings.switch_layer_numbers('encoder')}"
                                 f" / {settings.switch_layer_numbers('decoder')}, {settings.activation} FFNs)")
        used.add(key)
        return hf_state[key]

    used: set = set()
    shared = take("shared.weight")
    for key in HF_INPUT_EMBEDDINGS[1:]:
        if key in hf_state:
            if not torch.equal(take(key), shared):
                raise T5WeightsError(f"{key} differs from shared.weight: megatron's T5 has one input embedding "
                                     "for both stacks (Hugging Face unties them when tie_word_embeddings=False)")
    ours = {EMBEDDING: _vocab_rows(shared, settings.vocab_size, "shared.weight")}
    if settings.tie_word_embeddings:
        if "lm_head.weight" in hf_state and not torch.equal(take("lm_head.weight"), shared):
            raise T5WeightsError("lm_head.weight differs from shared.weight, but the settings tie them: "
                                 "build the settings with tie_word_embeddings=False")
    else:
        ours[OUTPUT] = ours[OUTPUT_ALIAS] = _vocab_rows(take("lm_head.weight"), settings.vocab_size, "lm_head.weight")
    for entry in entries(settings):
        ours[entry.ours] = entry.join([take(key) for key in entry.hf]).clone()
    unused = sorted(set(hf_state) - used)
    if unused:
        raise T5WeightsError(f"Hugging Face keys the settings have no place for: {unused[:6]}"
                             f"{' ...' if len(unused) > 6 else ''} (check the layer counts, the Switch layer "
                             "placement and the FFN activation)")
    return ours


def ours_to_hf(state: Mapping[str, torch.Tensor], settings: T5Settings,
               hf_vocab_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Our full state dict (every expert) -> Hugging Face's keys, `lm_head.weight` and the stacks'
    `embed_tokens` included. hf_vocab_size: keep the first rows of the vocabulary only (drops
    Megatron's padding); None keeps settings.vocab_size rows."""
    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise T5WeightsError(f"missing key {key!r} in the Switch T5 state dict (a state dict of one rank "
                                 "under expert or tensor parallelism holds only its part)")
        return state[key].detach()

    rows = settings.vocab_size if hf_vocab_size is None else hf_vocab_size
    shared = take(EMBEDDING)[:rows].clone()
    hf = {key: shared for key in HF_INPUT_EMBEDDINGS}
    hf["lm_head.weight"] = shared if settings.tie_word_embeddings else take(OUTPUT)[:rows].clone()
    for entry in entries(settings):
        tensor = take(entry.ours)
        if tensor.dim() == 3 and tensor.shape[0] != settings.switch.num_experts:
            raise T5WeightsError(f"{entry.ours} holds {tensor.shape[0]} experts, the model "
                                 f"{settings.switch.num_experts}: "
                                 "gather every expert (one process, or a consolidated checkpoint) first")
        hf.update(zip(entry.hf, (t.clone() for t in entry.split(tensor))))
    return hf


def _hf_sparse_layers(num_layers: int, sparse_step: int) -> List[int]:
    """1-based sparse layers of a Hugging Face stack (its rule: 0-based i % step == 1, or step == 1)."""
    if sparse_step <= 0:
        return []
    return [i + 1 for i in range(num_layers) if i % sparse_step == 1 or sparse_step == 1]


def _interval(layers: List[int], num_layers: int, stack: str) -> int:
    """k with our placement k, 2k, ... equal to `layers`; 0 for none."""
    if not layers:
        return 0
    for k in range(1, num_layers + 1):
        if layers == list(range(k, num_layers + 1, k)):
            return k
    raise T5ConfigError(f"the Hugging Face config puts the {stack}'s sparse layers at {layers} (1-based); "
                        f"Switch layers sit at k, 2k, ... of a stack, and no k gives that set")


def settings_from_hf_config(hf_config, vocab_size: Optional[int] = None, **switch_overrides) -> T5Settings:
    """T5Settings of a Hugging Face `SwitchTransformersConfig` (or its dict).

    vocab_size: our (padded) vocabulary, >= the config's; None keeps the config's.
    switch_overrides: SwitchConfig fields beyond what the config says (capacity factors, drop policy,
    backend, ...). Hugging Face's capacity is an integer per sequence; ours is a factor per micro-batch.
    """
    def attribute(key, default=None):
        return getattr(hf_config, key, default)

    get = hf_config.get if isinstance(hf_config, Mapping) else attribute
    activation = get("dense_act_fn", "relu")
    if get("feed_forward_proj") == "gated-gelu" and activation in ("gelu_new", "gelu_pytorch_tanh"):
        activation = "gated-gelu"  # T5 v1.1's FFN (wi_0, wi_1), as T5X computes it
    elif activation != "relu":
        raise T5ConfigError(f"Hugging Face's SwitchTransformers applies dense_act_fn {activation!r} ungated; "
                            f"megatron-switch's T5 has FFNs {', '.join(FFN_ACTIVATIONS)} (relu for the released "
                            "checkpoints; gated-gelu: feed_forward_proj 'gated-gelu' with dense_act_fn 'gelu_new')")
    layers = {"encoder": get("num_layers"), "decoder": get("num_decoder_layers") or get("num_layers")}
    steps = {}
    for stack in STACKS:
        step = get(f"{stack}_sparse_step")
        if step is None:  # a dict straight from config.json: the step as Hugging Face derives it
            sparse = get(f"num_sparse_{stack}_layers")
            step = layers[stack] // sparse if sparse else layers[stack]
        steps[stack] = _interval(_hf_sparse_layers(layers[stack], step), layers[stack], stack)
    switch = None
    if any(steps.values()):
        switch = SwitchConfig(**{**dict(
            num_experts=get("num_experts"), expert_interval=max(steps.values()), activation=FFN_ACTIVATIONS[activation],
            expert_bias=False,
            aux_loss_coeff=get("router_aux_loss_coef"), z_loss_coeff=get("router_z_loss_coef"),
            jitter_eps=get("router_jitter_noise")), **switch_overrides})
    return T5Settings(
        vocab_size=vocab_size or get("vocab_size"), d_model=get("d_model"), num_heads=get("num_heads"),
        d_kv=get("d_kv"), d_ff=get("d_ff"), encoder_layers=layers["encoder"], decoder_layers=layers["decoder"],
        relative_attention_num_buckets=get("relative_attention_num_buckets"),
        relative_attention_max_distance=get("relative_attention_max_distance"), activation=activation,
        tie_word_embeddings=get("tie_word_embeddings", True), dropout=get("dropout_rate"),
        layer_norm_epsilon=get("layer_norm_epsilon"), switch=switch,
        encoder_expert_interval=steps["encoder"], decoder_expert_interval=steps["decoder"])


# megatron's sharded-state-dict keys (what torch_dist checkpoints store) for the state-dict names
# above that differ: the pre-attention and pre-FFN norms are stored with the linear layer they
# precede, the expert banks under megatron's expert names.
_CHECKPOINT_NAMES = ((".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"),
                     (".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"),
                     (".mlp.experts.weight1", ".mlp.experts.linear_fc1.weight"),
                     (".mlp.experts.weight2", ".mlp.experts.linear_fc2.weight"))


def checkpoint_name(name: str) -> str:
    """The key a torch_dist checkpoint stores the Switch T5 state-dict tensor `name` under."""
    for suffix, stored in _CHECKPOINT_NAMES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + stored
    return name


def state_dict_name(key: str) -> str:
    """Inverse of `checkpoint_name`."""
    for suffix, stored in _CHECKPOINT_NAMES:
        if key.endswith(stored):
            return key[: -len(stored)] + suffix
    return key


def extra_state_names(settings: T5Settings) -> List[str]:
    """The `_extra_state` objects a Switch T5 checkpoint holds (one per megatron linear layer; None
    for the local layers)."""
    names = []
    for stack in STACKS:
        switch = settings.switch_layer_numbers(stack)
        for i in range(settings.num_layers(stack)):
            linears = ["self_attention.linear_qkv", "self_attention.linear_proj"]
            if stack == "decoder":
                linears += ["cross_attention.linear_q", "cross_attention.linear_kv", "cross_attention.linear_proj"]
            if i + 1 not in switch:
                linears += ["mlp.linear_fc1", "mlp.linear_fc2"]
            names += [f"{stack}.layers.{i}.{linear}._extra_state" for linear in linears]
    return names + ["lm_head.output_layer._extra_state", "output_layer._extra_state"]


def hf_shapes(settings: T5Settings, hf_vocab_size: int) -> Dict[str, tuple]:
    """The shape of every Hugging Face tensor of `settings` (`lm_head.weight` when untied; the
    stacks' `embed_tokens` when untied, as `save_pretrained` writes them)."""
    h, inner, ffn = settings.d_model, settings.num_heads * settings.d_kv, settings.d_ff

    def shape(key: str) -> tuple:
        if key.endswith(("layer_norm.weight", "final_layer_norm.weight")):
            return (h,)
        if key.endswith("relative_attention_bias.weight"):
            return (settings.relative_attention_num_buckets, settings.num_heads)
        if key.endswith((".q.weight", ".k.weight", ".v.weight")):
            return (inner, h)
        if key.endswith(".o.weight"):
            return (h, inner)
        if key.endswith(("wi.weight", "wi_0.weight", "wi_1.weight")):
            return (ffn, h)
        if key.endswith("wo.weight"):
            return (h, ffn)
        if key.endswith("router.classifier.weight"):
            return (settings.switch.num_experts, h)
        raise KeyError(key)

    shapes = {key: shape(key) for entry in entries(settings) for key in entry.hf}
    embeddings = ("shared.weight",) if settings.tie_word_embeddings else (*HF_INPUT_EMBEDDINGS, "lm_head.weight")
    return {**dict.fromkeys(embeddings, (hf_vocab_size, h)), **shapes}


def settings_from_model_config(model_config: Mapping, tied: bool, **switch_overrides) -> T5Settings:
    """T5Settings of a Switch T5 checkpoint's recorded model_config (`SwitchT5Model.description` and
    the shared model fields); `tied`: whether it has no separate output layer."""
    get = model_config.get
    if get("model") != "t5":
        raise T5ConfigError(f"the checkpoint holds a {str(get('model', 'gpt')).upper()} model: Hugging Face's Switch "
                            "models are encoder-decoders (SwitchTransformersForConditionalGeneration); only a "
                            "--model t5 checkpoint has their form")
    activation = get("feed_forward_proj", "relu")
    switch = None
    if get("num_experts"):
        switch = SwitchConfig(**{**dict(num_experts=int(get("num_experts")),
                                        expert_interval=int(get("expert_interval") or 1),
                                        activation=FFN_ACTIVATIONS[activation], expert_bias=False),
                                 **switch_overrides})
    return T5Settings(
        vocab_size=int(get("padded_vocab_size")), d_model=int(get("hidden_size")),
        num_heads=int(get("num_attention_heads")), d_kv=int(get("kv_channels")), d_ff=int(get("ffn_hidden_size")),
        encoder_layers=int(get("encoder_num_layers")), decoder_layers=int(get("decoder_num_layers")),
        relative_attention_num_buckets=int(get("relative_attention_num_buckets")),
        relative_attention_max_distance=int(get("relative_attention_max_distance")), activation=activation,
        tie_word_embeddings=tied, switch=switch,
        encoder_expert_interval=int(get("encoder_expert_interval") or 0),
        decoder_expert_interval=int(get("decoder_expert_interval") or 0))


def hf_config_of(settings: T5Settings, hf_vocab_size: int, base: Optional[Mapping] = None) -> Dict[str, object]:
    """A Hugging Face `SwitchTransformersConfig` (as config.json holds it) for `settings`: `base` (the
    config a model was imported with) with the architecture's fields set from `settings`. Raises
    T5ConfigError for a Switch layer placement Hugging Face's sparse-step rule cannot express."""
    sparse = {}
    for stack in STACKS:
        layers, k = settings.num_layers(stack), settings.expert_interval(stack)
        count = len(settings.switch_layer_numbers(stack))
        step = layers // count if count else 0
        if settings.switch_layer_numbers(stack) != _hf_sparse_layers(layers, step):
            raise T5ConfigError(f"the {stack}'s Switch layers sit at every {k}-th layer "
                                f"({settings.switch_layer_numbers(stack)}, 1-based); Hugging Face places sparse "
                                f"layers at its sparse step (every layer, or layers 2, 2+step, ...): only "
                                "--moe-layer-freq 1 and 2 have a Hugging Face form")
        sparse[stack] = count
    gated = settings.activation == "gated-gelu"
    config: Dict[str, object] = dict(base) if base else {
        "architectures": ["SwitchTransformersForConditionalGeneration"], "model_type": "switch_transformers",
        "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "router_bias": False, "router_dtype": "float32", "router_ignore_padding_tokens": False,
        "layer_norm_epsilon": settings.layer_norm_epsilon, "dropout_rate": settings.dropout}
    if gated or "feed_forward_proj" in config:
        config["feed_forward_proj"] = settings.activation
    config.update(
        vocab_size=hf_vocab_size, d_model=settings.d_model, d_kv=settings.d_kv, d_ff=settings.d_ff,
        num_layers=settings.encoder_layers, num_decoder_layers=settings.decoder_layers, num_heads=settings.num_heads,
        num_sparse_encoder_layers=sparse["encoder"], num_sparse_decoder_layers=sparse["decoder"],
        encoder_sparse_step=settings.encoder_layers // sparse["encoder"] if sparse["encoder"] else 0,
        decoder_sparse_step=settings.decoder_layers // sparse["decoder"] if sparse["decoder"] else 0,
        relative_attention_num_buckets=settings.relative_attention_num_buckets,
        relative_attention_max_distance=settings.relative_attention_max_distance,
        tie_word_embeddings=settings.tie_word_embeddings, dense_act_fn="gelu_new" if gated else "relu")
    if settings.switch is not None:
        config["num_experts"] = settings.switch.num_experts
    return config
