"""`megatron-switch convert --upcycle`: a dense GPT or T5 checkpoint read as a Switch checkpoint
(sparse upcycling), for `convert` to write at any layout and format.

`UpcycledReader` wraps the dense checkpoint's reader and presents, lazily, the tensors a Switch run
of the same model saves. Switch layers sit at the 1-based layer numbers k, 2k, ... of every stack
(GPT: `decoder`; T5: `encoder` and `decoder`), the trainer's `--moe-layer-freq k` rule
(`config.is_switch_layer`); layer number n has the key `<stack>.layers.<n-1>`. In each of them,
with E experts, h the hidden size, f the FFN width and f' = 2f for a gated FFN ([gate; up]), else f:

  mlp.linear_fc1.weight [f', h]  ->  mlp.experts.linear_fc1.weight [E, f', h]   every expert a copy
  mlp.linear_fc1.bias   [f']     ->  mlp.experts.linear_fc1.bias   [E, f']      (GPT; T5 has no biases)
  mlp.linear_fc2.weight [h, f]   ->  mlp.experts.linear_fc2.weight [E, h, f]
  mlp.linear_fc2.bias   [h]      ->  mlp.experts.linear_fc2.bias   [E, h]
  (new)                          ->  mlp.router.weight [E, h] float32, as a Switch run with the same
                                     --seed starts it (`router.initial_router_weight`: the paper's
                                     truncated normal, sigma = sqrt(init_scale / h), init_scale 0.1)
The dense layers' own `mlp.linear_fc*._extra_state` objects go; everything else (attention, every
norm, including the pre-MLP norm that megatron keys `mlp.linear_fc1.layer_norm_*`, embeddings, the
other layers) is the dense checkpoint's. Reading a block of an expert bank reads the dense tensor's
block once and repeats it for the requested experts only: memory is bounded by the block.
The expert activation is the dense FFN's: GPT gelu (megatron's default), swiglu for a gated GPT FFN
(megatron's --swiglu); T5 relu or gated-gelu (geglu_tanh), which the trainer's T5 takes by itself.

What the upcycled model computes at first. Let x be a token's input to a Switch layer's MLP (the
output of its pre-MLP norm), q = softmax(W_r x) the float32 router probabilities (in training the
router sees x times its jitter noise), e = argmax q and p = q_e = max q its gate. Megatron's dense
MLP returns (W2 act(W1 x + b1), b2) and the layer adds b2 itself; `SwitchMLP` returns
(p * E_e(x), None) with the expert's bias inside E_e. Every expert being the dense FFN, a kept token gets

    SwitchMLP(x) = p * FFN_dense(x),    FFN_dense(x) = W2 act(W1 x + b1) + b2

(the gate scales the bias too), and a token dropped by capacity (its place in expert e's queue is
>= C) gets 0: the layer passes its residual on unchanged. Since 1/E <= p < 1 (p = 1 only if E = 1), the
upcycled model is not the dense model: each Switch layer scales each token's FFN output by its gate.
With the paper's small router initialisation the logits are small (variance about init_scale times
the mean square of x), so p starts near 1/E. Dense layers and all other parts compute as before.

Optimizer state (Adam's moments `optimizer.state.exp_avg[_sq].<key>`, float32 masters
`optimizer.main_param.<key>` of bf16 parameters, the common `optimizer` param_groups and
`optimizer_step`):
- "drop" (default): none of it is written; the run that loads the result starts Adam from zero and
  its float32 masters from the loaded weights, as after `convert --no-optim`.
- "replicate": every other tensor's state as saved; each expert gets its dense FFN tensor's moments
  and master; each router zero moments and no master (routers are float32 in every run, so no run
  keeps a master of them). Adam's step count is one number for all parameters (`optimizer_step`):
  the routers' zero moments resume at the dense run's step, so their bias correction is that of a
  late step, and their first updates are about (1 - beta1) / sqrt(1 - beta2) times the gradient's
  sign (3.2 with Megatron's betas) instead of 1.
The iteration, consumed samples and learning-rate schedule are the dense run's.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import torch

from megatron_switch.checkpoint.contents import (
    OPTIMIZER_PREFIXES,
    CheckpointReader,
    ConvertError,
    Index,
    TensorSpec,
    full_index,
    is_optimizer,
)
from megatron_switch.checkpoint.layout import TRACKER, CheckpointError, latest_checkpoint
from megatron_switch.checkpoint.sharding import EXPERTS
from megatron_switch.config import GATED_ACTIVATIONS, SwitchConfig

OPTIMIZER_CHOICES = ("drop", "replicate")
MOMENTS = tuple(p for p in OPTIMIZER_PREFIXES if p.startswith("optimizer.state."))
_LAYER_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.")
_ROUTER = ".mlp.router."


@dataclasses.dataclass(frozen=True)
class Upcycle:
    """What to build from the dense checkpoint (`convert(..., upcycle=Upcycle(...))`).

    num_experts: E experts per Switch layer (>= 2). expert_interval: Switch layers k, 2k, ... of each
    stack (the trainer's --moe-layer-freq). optimizer: "drop" or "replicate" (module docstring).
    seed, init_scale: the routers' initialisation, as a Switch run with --seed and --switch-init-scale
    draws it.
    """

    num_experts: int
    expert_interval: int = 1
    optimizer: str = "drop"
    seed: int = SwitchConfig.init_seed
    init_scale: float = SwitchConfig.init_scale

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 2:
            raise ConvertError(f"--num-experts must be >= 2 to upcycle, got {self.num_experts} (one expert would "
                               f"be the dense FFN itself): pass --num-experts 2 or more")
        if not isinstance(self.expert_interval, int) or self.expert_interval < 1:
            raise ConvertError(f"--moe-layer-freq must be >= 1 (a Switch layer every k-th layer; 1: every layer), "
                               f"got {self.expert_interval}")
        if self.optimizer not in OPTIMIZER_CHOICES:
            raise ConvertError(f"--upcycle-optimizer must be one of {', '.join(OPTIMIZER_CHOICES)}, got "
                               f"{self.optimizer!r}")
        if not self.init_scale > 0:
            raise ConvertError(f"the router init scale must be > 0, got {self.init_scale}")

    def check_recorded(self, load: str) -> None:
        """Refuse from the writer's identity alone (integrity.json), before the checkpoint is verified
        and read, what `wrap` would refuse: a Switch source, or k beyond a stack's layers."""
        from megatron_switch.checkpoint.integrity import writer_of

        try:
            iter_dir = latest_checkpoint(load)[1] if os.path.isfile(os.path.join(load, TRACKER)) else load
            writer = writer_of(iter_dir) if os.path.isdir(iter_dir) else None
        except (CheckpointError, OSError):
            return  # open_checkpoint says what is wrong with the path
        config = (writer or {}).get("model_config") or {}
        if config.get("num_experts"):
            raise _already_switch(load, f"{config['num_experts']} experts per Switch layer")
        if config.get("model") == "t5":
            layers = {s: config.get(f"{s}_num_layers") for s in ("encoder", "decoder")}
        else:
            layers = {"decoder": config.get("num_layers")}
        self.check_interval(load, {s: n for s, n in layers.items() if n})

    def check_interval(self, load: str, layers: dict[str, int]) -> None:
        """ConvertError when k exceeds the layers of a stack ({stack: layers})."""
        for stack, count in layers.items():
            if self.expert_interval > count:
                fewest = min(layers.values())
                raise ConvertError(f"--moe-layer-freq {self.expert_interval} puts no Switch layer in the {count}-layer "
                                   f"{stack} of {load}: use --moe-layer-freq {fewest} or less")

    def wrap(self, dense: CheckpointReader, log: Callable[[str], Any] = print) -> "UpcycledReader":
        """The Switch checkpoint made of `dense` (which the result closes); ConvertError, before any
        tensor is read, when `dense` cannot be upcycled as asked."""
        reader = UpcycledReader(dense, self)
        log(reader.describe())
        return reader


def _already_switch(load: str, what: str) -> ConvertError:
    return ConvertError(f"--load {load} already has expert layers ({what}): --upcycle starts from a dense "
                        f"checkpoint. Convert it without --upcycle (its layout and format), or upcycle the dense "
                        f"checkpoint it came from")


@dataclasses.dataclass(frozen=True)
class _SwitchLayer:
    stack: str
    number: int  # 1-based, within the stack

    @property
    def prefix(self) -> str:
        return f"{self.stack}.layers.{self.number - 1}.mlp."


class UpcycledReader(CheckpointReader):
    """The Switch checkpoint a dense checkpoint `dense` becomes (module docstring), read lazily."""

    def __init__(self, dense: CheckpointReader, upcycle: Upcycle):
        super().__init__(dense.path, trusted=dense.trusted)
        from megatron_switch.experts.base import CHECKPOINT_KEYS

        self.dense, self.upcycle = dense, upcycle
        self.format_name = dense.format_name
        config = dict(dense.common.get("model_config") or {})
        names = [n for n in dense.tensors if not is_optimizer(n)]
        switch_keys = [n for n in names if EXPERTS in n or _ROUTER in n]
        if switch_keys or config.get("num_experts"):
            raise _already_switch(dense.path, switch_keys[0] if switch_keys else f"{config['num_experts']} experts")
        counts: dict[str, int] = {}
        for name in names:
            match = _LAYER_KEY.match(name)
            if match:
                counts[match.group(1)] = max(counts.get(match.group(1), 0), int(match.group(2)) + 1)
        self.is_t5 = config.get("model") == "t5" or "encoder" in counts
        if not counts.get("decoder") or (self.is_t5 and not counts.get("encoder")):
            raise ConvertError(f"--load {dense.path} has no transformer layers (decoder.layers.<i>.*"
                               f"{', encoder.layers.<i>.*' if self.is_t5 else ''}): not a GPT or T5 checkpoint")
        upcycle.check_interval(dense.path, counts)
        self.layers = [_SwitchLayer(stack, n) for stack in ("encoder", "decoder") if stack in counts
                       for n in range(upcycle.expert_interval, counts[stack] + 1, upcycle.expert_interval)]
        self.source_config = config
        self.bias, self.gated = self._check_ffns()
        self.activation = self._activation()
        self.hidden_size = dense.tensors[self.layers[0].prefix + "linear_fc1.weight"].shape[1]

        # name -> how to make it: ("copy", dense name) | ("experts", dense name) | ("router", layer) | ("zeros", None)
        self._made: dict[str, tuple[str, Any]] = {}
        ffn = {layer.prefix + key: layer.prefix + "experts." + key for layer in self.layers
               for key in CHECKPOINT_KEYS.values() if layer.prefix + key in dense.tensors}
        replicate = upcycle.optimizer == "replicate"
        if replicate:
            self._check_optimizer(ffn)
        for name in dense.tensors:
            key = name[len(prefix):] if (prefix := _optimizer_prefix(name)) else name
            if prefix and not replicate:
                continue
            if key in ffn:
                self._made[prefix + ffn[key]] = ("experts", name)
            else:
                self._made[name] = ("copy", name)
        for layer in self.layers:
            router = layer.prefix + "router.weight"
            self._made[router] = ("router", layer)
            if replicate:
                self._made.update({prefix + router: ("zeros", None) for prefix in MOMENTS})
        E = upcycle.num_experts
        for name, (how, source) in self._made.items():
            if how == "router" or how == "zeros":
                self.tensors[name] = TensorSpec((E, self.hidden_size), torch.float32)
            else:
                spec = dense.tensors[source]
                self.tensors[name] = spec if how == "copy" else TensorSpec((E, *spec.shape), spec.dtype)
        switch_mlps = tuple(layer.prefix for layer in self.layers)
        self.objects = {k: v for k, v in dense.objects.items() if not k.startswith(switch_mlps)}
        self.common = {k: v for k, v in dense.common.items() if replicate or k not in ("optimizer", "optimizer_step")}
        self.common["model_config"] = self._model_config(counts)
        self.dropped_optimizer = 0 if replicate else sum(1 for n in dense.tensors if is_optimizer(n))

    def _check_ffns(self) -> tuple[bool, bool]:
        """(the FFNs have biases, they are gated), the same in every Switch layer."""
        tensors, found = self.dense.tensors, set()
        for layer in self.layers:
            for key in ("linear_fc1.weight", "linear_fc2.weight"):
                if layer.prefix + key not in tensors:
                    raise ConvertError(f"--load {self.dense.path} has no {layer.prefix + key}: layer {layer.number} of "
                                       f"the {layer.stack} has no dense FFN to copy into its experts")
            fc1, fc2 = (tensors[layer.prefix + key].shape for key in ("linear_fc1.weight", "linear_fc2.weight"))
            if len(fc1) != 2 or len(fc2) != 2 or fc1[1] != fc2[0] or fc1[0] not in (fc2[1], 2 * fc2[1]):
                raise ConvertError(f"--load {self.dense.path}: {layer.prefix}linear_fc1.weight {tuple(fc1)} and "
                                   f"linear_fc2.weight {tuple(fc2)} are not one FFN (expected [f or 2f, h] and [h, f])")
            biases = tuple(layer.prefix + k in tensors for k in ("linear_fc1.bias", "linear_fc2.bias"))
            if biases[0] != biases[1]:
                raise ConvertError(f"--load {self.dense.path}: layer {layer.number} of the {layer.stack} has a bias on "
                                   f"only one of linear_fc1 and linear_fc2; Switch experts have both or neither")
            found.add((biases[0], fc1[0] == 2 * fc2[1]))
        if len(found) > 1:
            raise ConvertError(f"--load {self.dense.path}: the dense FFNs differ between layers (biases or gating); "
                               f"the experts of every Switch layer share one configuration")
        return found.pop()

    def _activation(self) -> str:
        """The expert activation (SwitchConfig.activation) that computes the dense FFN."""
        from megatron_switch.specs.t5_model import FFN_ACTIVATIONS

        config, path = self.source_config, self.dense.path
        if self.is_t5:
            proj = config.get("feed_forward_proj", "gated-gelu" if self.gated else "relu")
            activation = FFN_ACTIVATIONS.get(proj)
            if activation is None or (activation in GATED_ACTIVATIONS) != self.gated:
                raise ConvertError(f"--load {path}: its T5 FFN is {proj!r} but its linear_fc1 is "
                                   f"{'twice' if self.gated else 'once'} the FFN width; the Switch T5 has "
                                   f"{', '.join(FFN_ACTIVATIONS)} FFNs")
            if self.bias:
                raise ConvertError(f"--load {path}: a T5 with FFN biases; the Switch T5's experts have none")
            return activation
        if self.gated and not (config.get("swiglu") or config.get("gated_linear_unit")):
            raise ConvertError(f"--load {path}: its FFNs are gated ([gate; up] linear_fc1) but the checkpoint does not "
                               f"say which gating; the Switch layer's gated experts compute megatron's --swiglu "
                               f"(silu(gate) * up): upcycle a checkpoint that records swiglu")
        if self.gated:
            layout = self.dense.common.get("layout") or {}
            if int(layout.get("tp", 1)) > 1 and self.dense.format_name != "torch_dist":
                raise ConvertError(f"--load {path}: gated FFNs saved at tensor-parallel size {layout['tp']} in "
                                   f"{self.dense.format_name} files hold each rank's [gate; up] halves in turn, not "
                                   f"the FFN's; upcycle a torch_dist or tensor-parallel size 1 save of the dense model")
            return "swiglu"
        return "gelu"

    def _check_optimizer(self, ffn: dict[str, str]) -> None:
        path = self.dense.path
        if not self.dense.has_optimizer or "optimizer" not in self.dense.common:
            raise ConvertError(f"--upcycle-optimizer replicate: --load {path} holds no optimizer state (saved with "
                               f"--no-optim?): leave --upcycle-optimizer out (drop) to start Adam from zero")
        missing = [prefix + key for key in ffn for prefix in MOMENTS if prefix + key not in self.dense.tensors]
        if missing:
            raise ConvertError(f"--upcycle-optimizer replicate: --load {path} has no {missing[0]} (and "
                               f"{len(missing) - 1} more missing): its optimizer state is incomplete; leave "
                               f"--upcycle-optimizer out (drop) to start Adam from zero")

    def _model_config(self, counts: dict[str, int]) -> dict:
        """The dense run's model_config as a Switch run of the same model records it."""
        k = self.upcycle.expert_interval
        config = dict(self.source_config)
        config.update(num_experts=self.upcycle.num_experts, expert_interval=k)
        if self.is_t5:
            config.update(encoder_expert_interval=k, decoder_expert_interval=k)
        return config

    def _router(self, layer: _SwitchLayer) -> torch.Tensor:
        from megatron_switch.router import initial_router_weight
        from megatron_switch.specs.t5_model import DECODER_INIT_SEED_OFFSET

        seed = self.upcycle.seed + (DECODER_INIT_SEED_OFFSET if self.is_t5 and layer.stack == "decoder" else 0)
        switch = SwitchConfig(num_experts=self.upcycle.num_experts, init_seed=seed, init_scale=self.upcycle.init_scale)
        return initial_router_weight(switch, self.hidden_size, layer.number)

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        spec = self.tensors[name]
        index = index or full_index(spec.shape)
        how, source = self._made[name]
        if how == "copy":
            return self.dense.read(source, index)
        if how == "experts":  # the dense block once, repeated for the requested experts
            (first, stop), rest = index[0], index[1:]
            dense = self.dense.read(source, rest)
            return dense.unsqueeze(0).expand(stop - first, *dense.shape).contiguous()
        if how == "zeros":
            return torch.zeros([b - a for a, b in index], dtype=spec.dtype)
        weight = self._router(source)
        return weight[index[0][0]:index[0][1], index[1][0]:index[1][1]].clone()

    def close(self) -> None:
        self.dense.close()

    def describe(self) -> str:
        """What the conversion does, in two lines (before anything is read)."""
        stacks = dict.fromkeys(layer.stack for layer in self.layers)
        places = "; ".join(f"{stack} layers {[layer.number for layer in self.layers if layer.stack == stack]}"
                           for stack in stacks)
        what = (f" upcycling to {self.upcycle.num_experts} experts per Switch layer (--moe-layer-freq "
                f"{self.upcycle.expert_interval}: {places}, 1-based), each expert a copy of its layer's dense FFN "
                f"(activation {self.activation}, {'with' if self.bias else 'no'} biases), routers from seed "
                f"{self.upcycle.seed}")
        if self.upcycle.optimizer == "replicate":
            masters = any(n.startswith("optimizer.main_param.") for n in self.dense.tensors)
            state = (f" --upcycle-optimizer replicate: each expert starts with its dense FFN's Adam moments"
                     f"{' and float32 master' if masters else ''}, each router with zero moments")
        elif self.dropped_optimizer:
            state = (f" --upcycle-optimizer drop: the dense optimizer state ({self.dropped_optimizer} tensors) is "
                     f"not carried over; Adam starts from zero when training resumes from the result")
        else:
            state = " the dense checkpoint has no optimizer state: Adam starts from zero when training resumes"
        return what + "\n" + state

    def train_flags(self) -> list[str]:
        """The `megatron-switch train` flags to add to the dense run's to load the result."""
        flags = ["--moe-switch", "--num-experts", str(self.upcycle.num_experts),
                 "--moe-layer-freq", str(self.upcycle.expert_interval)]
        if not self.is_t5:  # the Switch T5 takes its FFN's activation and no biases by itself
            flags += ["--switch-expert-activation", self.activation]
            flags += [] if self.bias else ["--switch-no-expert-bias"]
        return flags

    def resume_hint(self, save: str) -> str:
        return (f" train it with the dense run's flags and: {' '.join(self.train_flags())} --load {save}")


def _optimizer_prefix(name: str) -> str:
    return next((p for p in OPTIMIZER_PREFIXES if name.startswith(p)), "")


def add_upcycle_args(parser) -> None:
    g = parser.add_argument_group(
        "upcycling", "--upcycle turns a dense GPT or T5 checkpoint into a Switch one: each expert of a Switch layer "
                     "starts as that layer's dense FFN, each router as a Switch run with --seed starts it. The "
                     "result computes p * FFN(x) in a Switch layer (p: the token's router probability), not the "
                     "dense model's FFN(x).")
    g.add_argument("--upcycle", action="store_true", help="Read --load as a dense checkpoint and write a Switch one.")
    g.add_argument("--num-experts", type=int, default=None, help="Experts per Switch layer (>= 2).")
    g.add_argument("--moe-layer-freq", type=int, default=None,
                   help="Switch layers at layers k, 2k, ... (1-based) of each stack, as the trainer's flag (default 1: "
                        "every layer).")
    g.add_argument("--upcycle-optimizer", choices=OPTIMIZER_CHOICES, default=None,
                   help="drop (default): no optimizer state, Adam starts from zero; replicate: each expert gets its "
                        "dense FFN's Adam moments and float32 master, each router zero moments.")
    g.add_argument("--seed", type=int, default=None,
                   help=f"Seed of the routers' initialisation (default {SwitchConfig.init_seed}, the trainer's).")


def upcycle_from_args(args) -> Upcycle | None:
    """The Upcycle the flags ask for (None without --upcycle); ConvertError for flags that do not go together."""
    given = [flag for flag, value in (("--num-experts", args.num_experts), ("--moe-layer-freq", args.moe_layer_freq),
                                      ("--upcycle-optimizer", args.upcycle_optimizer), ("--seed", args.seed))
             if value is not None]
    if not args.upcycle:
        if given:
            raise ConvertError(f"{', '.join(given)} only apply with --upcycle (a dense checkpoint into a Switch one): "
                               f"add --upcycle, or drop {'them' if len(given) > 1 else 'it'}")
        return None
    if args.num_experts is None:
        raise ConvertError("--upcycle needs --num-experts N (experts per Switch layer, N >= 2)")
    if args.no_optim and args.upcycle_optimizer == "replicate":
        raise ConvertError("--no-optim drops the optimizer state that --upcycle-optimizer replicate copies: pass one "
                           "of them")
    return Upcycle(num_experts=args.num_experts,
                   expert_interval=1 if args.moe_layer_freq is None else args.moe_layer_freq,
                   optimizer=args.upcycle_optimizer or "drop",
                   seed=SwitchConfig.init_seed if args.seed is None else args.seed)
