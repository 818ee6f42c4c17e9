"""`megatron-switch convert --upcycle` on dense checkpoints from real training runs (a GPT with biased gelu
FFNs in float32, a T5 with gated-gelu FFNs in bf16): every Switch layer computes p(x) * FFN_dense(x) for
the trainer-built models, routers start as a Switch run starts them, the layers sit at k, 2k, ..., the
trainer resumes from the result (replicated optimizer state, another expert-parallel layout), and bad
requests fail with their fix and leave nothing behind."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os

import pytest
import torch

from megatron_switch.checkpoint.contents import ConvertError
from megatron_switch.checkpoint.convert import convert, main, open_checkpoint
from megatron_switch.checkpoint.upcycle import Upcycle
from tests.test_train import metrics, run_train

GPT = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
       "--micro-batch-size", "2", "--log-interval", "1", "--lr-decay-iters", "8"]
T5 = ["--model", "t5", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "64",
      "--micro-batch-size", "2", "--log-interval", "1", "--lr-decay-iters", "8", "--feed-forward-proj", "gated-gelu",
      "--bf16"]
MODELS = {"gpt": GPT, "t5": T5}
DENSE_ITERS = {"gpt": 2, "t5": 1}
# (model, k) -> optimizer state and target expert-parallel size of the upcycled checkpoint
CASES = {("gpt", 1): ("drop", None), ("gpt", 2): ("replicate", 2), ("t5", 1): ("drop", None),
         ("t5", 2): ("replicate", None)}
EXPERTS = 4


def _quiet(*args):
    pass


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A dense checkpoint of each model, from `megatron-switch train`."""
    root = tmp_path_factory.mktemp("dense")
    for model, flags in MODELS.items():
        run_train(["--nproc-per-node", "1", *flags, "--train-iters", str(DENSE_ITERS[model]),
                   "--save", str(root / model), "--plots-dir", str(root / f"{model}-plots")], root)
    return {model: str(root / model) for model in MODELS}


@pytest.fixture(scope="module")
def upcycled(dense, tmp_path_factory):
    """(model, k) -> the upcycled checkpoint of CASES, made on first use (GPT through the command line);
    `upcycled.logs[(model, k)]`: what the conversion printed."""
    root = tmp_path_factory.mktemp("upcycled")
    made, logs = {}, {}

    def get(model: str, k: int) -> str:
        if (model, k) not in made:
            optimizer, ep = CASES[(model, k)]
            path = str(root / f"{model}-k{k}")
            if model == "gpt":
                output = io.StringIO()
                with contextlib.redirect_stdout(output):
                    main(["--upcycle", "--num-experts", str(EXPERTS), "--moe-layer-freq", str(k), "--upcycle-optimizer",
                          optimizer, "--load", dense[model], "--save", path, "--no-progress-bar",
                          *(["--target-ep", str(ep)] if ep else [])])
                logs[(model, k)] = output.getvalue().splitlines()
            else:
                logs[(model, k)] = []
                convert(dense[model], path, target_ep=ep, progress=False, log=logs[(model, k)].append,
                        upcycle=Upcycle(EXPERTS, k, optimizer))
            made[(model, k)] = path
        return made[(model, k)]

    get.logs = logs
    return get


def _printed_flags(lines: list[str], path: str) -> list[str]:
    """The train flags the conversion printed for loading `path`."""
    hint = next(line for line in lines if "train it with the dense run's flags and:" in line)
    flags = hint.split("and:", 1)[1].split()
    assert flags[-2:] == ["--load", path]
    return flags[:-2]


def _model(model: str, switch_flags: list[str]):
    from megatron_switch.compat import enable_cpu_support
    from megatron_switch.training.arguments import parse_args
    from megatron_switch.training.model import build_model

    enable_cpu_support()
    flags = [f for f in MODELS[model] if f != "--bf16"]  # float32 models: bf16 weights load exactly
    args = parse_args([*flags, *switch_flags])
    return build_model(args, 384).eval()


def _load(model, path: str) -> set:
    """Every tensor of `model`'s checkpoint state read in full from `path`; returns the keys read."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_switch.checkpoint.sharding import model_metadata

    reader, keys = open_checkpoint(path), set()
    try:
        with torch.no_grad():
            for sharded in nested_values(model.sharded_state_dict(metadata=model_metadata())):
                if isinstance(sharded, (ShardedTensor, ShardedTensorFactory)):
                    sharded.data.copy_(reader.read(sharded.key))
                    keys.add(sharded.key)
    finally:
        reader.close()
    return keys


def _stacks(model) -> dict:
    return {name: getattr(model, name).layers for name in ("encoder", "decoder") if getattr(model, name, None)}


def _tensors(path: str) -> tuple[dict, dict]:
    reader = open_checkpoint(path)
    try:
        return {n: reader.read(n) for n in reader.tensors}, reader.common
    finally:
        reader.close()


@pytest.mark.parametrize("model, k", list(CASES), ids=[f"{m}-k{k}" for m, k in CASES])
def test_switch_layer_is_gate_times_dense_ffn(dense, upcycled, single_process_groups, model, k):
    """For the same input, each Switch layer's MLP returns p(x) * (dense output + dense bias), p the
    router's top-1 probability; the layers sit at k, 2k, ...; everything else is the dense checkpoint's;
    the routers are those a Switch run with the same seed starts with."""
    from megatron_switch.layer import SwitchMLP

    path = upcycled(model, k)
    switch_flags = ["--moe-switch", "--num-experts", str(EXPERTS), "--moe-layer-freq", str(k),
                    "--switch-eval-capacity-factor", "0"]  # dropless: every token reaches its expert
    if model == "gpt":
        switch_flags += ["--switch-expert-activation", "gelu"]
    dense_model, switch_model = _model(model, []), _model(model, switch_flags)
    fresh_routers = {n: p.detach().clone() for n, p in switch_model.named_parameters() if n.endswith("router.weight")}
    assert _load(dense_model, dense[model])
    keys = _load(switch_model, path)
    upcycled_tensors, common = _tensors(path)
    dense_tensors, dense_common = _tensors(dense[model])
    # exactly the tensors the Switch model holds, and its model description
    assert keys == {n for n in upcycled_tensors if not n.startswith("optimizer.")}
    config = dict(dense_common["model_config"], num_experts=EXPERTS, expert_interval=k)
    if model == "t5":
        config.update(encoder_expert_interval=k, decoder_expert_interval=k)
    assert common["model_config"] == config
    # the routers: a fresh Switch run's, different in every layer and stack
    assert len(fresh_routers) == sum(len(layers) // k for layers in _stacks(switch_model).values())
    for name, weight in fresh_routers.items():
        assert torch.equal(weight, upcycled_tensors[name]), name
    assert len({tuple(w.flatten().tolist()) for w in fresh_routers.values()}) == len(fresh_routers)

    # every tensor the upcycled checkpoint keeps (optimizer state included) is the dense one
    assert all(torch.equal(upcycled_tensors[n], t) for n, t in dense_tensors.items() if n in upcycled_tensors)
    replaced = set()
    generator = torch.Generator().manual_seed(k)
    for stack, layers in _stacks(switch_model).items():
        for index, (switch_layer, dense_layer) in enumerate(zip(layers, _stacks(dense_model)[stack])):
            number = index + 1
            prefix = f"{stack}.layers.{index}.mlp."
            assert isinstance(switch_layer.mlp, SwitchMLP) == (number % k == 0), (stack, number)
            if not isinstance(switch_layer.mlp, SwitchMLP):
                continue
            # every expert a copy of the dense FFN, which is gone
            for key in ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias"):
                if prefix + key in dense_tensors:
                    bank = upcycled_tensors[prefix + "experts." + key]
                    assert bank.shape[0] == EXPERTS and all(torch.equal(e, dense_tensors[prefix + key]) for e in bank)
                    replaced.add(prefix + key)
            x = torch.randn(8, 2, 32, generator=generator)
            with torch.no_grad():
                out, bias = dense_layer.mlp(x)
                ffn = out + bias if bias is not None else out
                assert (bias is not None) == (model == "gpt")
                y, none = switch_layer.mlp(x)
            assert none is None and float(switch_layer.mlp.last_stats.dropped_fraction) == 0
            w_Eh = switch_layer.mlp.router.weight.detach()
            p = torch.softmax(x.reshape(-1, 32) @ w_Eh.t(), dim=-1).max(dim=-1).values.view(8, 2, 1)
            assert float(p.min()) > 1 / EXPERTS
            torch.testing.assert_close(y, p * ffn, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(y, ffn, rtol=1e-2, atol=1e-3)  # not the dense model
    assert {n for n in dense_tensors if n not in upcycled_tensors and not n.startswith("optimizer.")} == replaced


def test_a_token_dropped_by_capacity_gets_nothing(dense, upcycled, single_process_groups):
    """With one slot per expert, the first token routed to each expert gets p * FFN_dense, the others 0."""
    path = upcycled("gpt", 1)
    flags = ["--moe-switch", "--num-experts", str(EXPERTS), "--moe-layer-freq", "1",
             "--switch-expert-activation", "gelu"]
    dense_model, switch_model = _model("gpt", []), _model("gpt", flags)
    _load(dense_model, dense["gpt"])
    _load(switch_model, path)
    mlp, dense_mlp = switch_model.decoder.layers[2].mlp, dense_model.decoder.layers[2].mlp
    tight = dataclasses.replace(mlp.switch, eval_capacity_factor=0.25, min_capacity=1)
    mlp.switch = mlp.router.switch = tight
    x = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, bias = dense_mlp(x)
        y, _ = mlp(x)
    probs = torch.softmax(x.reshape(-1, 32) @ mlp.router.weight.t(), dim=-1)
    seen, expected = set(), torch.zeros(16, 32)
    for t, (p, e) in enumerate(zip(*probs.max(dim=-1))):  # first come, first served: one slot each
        if int(e) not in seen:
            seen.add(int(e))
            expected[t] = p * (out + bias).reshape(-1, 32)[t]
    assert 0 < len(seen) < 16
    torch.testing.assert_close(y.reshape(-1, 32), expected, rtol=1e-5, atol=1e-6)


def test_router_init_is_the_papers_and_deterministic(dense):
    """W_r: truncated normal, sigma = sqrt(0.1 / h), cut at 2 sigma; the same for the same --seed."""
    def router(seed: int, experts: int = 64):
        reader = Upcycle(experts, 2, seed=seed).wrap(open_checkpoint(dense["gpt"]), log=_quiet)
        try:
            assert reader.tensors["decoder.layers.1.mlp.router.weight"].dtype == torch.float32
            return reader.read("decoder.layers.1.mlp.router.weight"), reader.read("decoder.layers.3.mlp.router.weight")
        finally:
            reader.close()

    (w, other), (again, _), (reseeded, _) = router(1234), router(1234), router(7)
    sigma = math.sqrt(0.1 / 32)
    assert w.shape == (64, 32) and torch.equal(w, again)
    assert not torch.equal(w, reseeded) and not torch.equal(w, other)
    assert float(w.abs().max()) <= 2 * sigma
    # the normal truncated at +-2 sigma has standard deviation 0.880 sigma
    assert float(w.std()) == pytest.approx(0.880 * sigma, rel=0.08)
    assert abs(float(w.mean())) < 4 * sigma / math.sqrt(w.numel())


def test_optimizer_state_is_replicated_or_dropped(dense, upcycled):
    """replicate: each expert has its dense FFN's moments and float32 master, each router zero moments;
    drop (the default): no optimizer state at all, and the conversion says so."""
    dense_tensors, dense_common = _tensors(dense["t5"])
    tensors, common = _tensors(upcycled("t5", 2))  # replicate, bf16: Adam's moments and float32 masters
    assert common["optimizer"] == dense_common["optimizer"] and common["optimizer_step"] == 1.0
    for stack in ("encoder", "decoder"):
        prefix = f"{stack}.layers.1.mlp."
        for kind in ("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq.", "optimizer.main_param."):
            for key in ("linear_fc1.weight", "linear_fc2.weight"):
                bank, one = tensors[kind + prefix + "experts." + key], dense_tensors[kind + prefix + key]
                assert bank.dtype == torch.float32 and all(torch.equal(e, one) for e in bank)
                assert kind + prefix + key not in tensors
        for kind in ("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq."):
            assert torch.equal(tensors[kind + prefix + "router.weight"], torch.zeros(EXPERTS, 32))
        assert "optimizer.main_param." + prefix + "router.weight" not in tensors  # the router is float32
        assert tensors[prefix + "experts.linear_fc1.weight"].dtype == torch.bfloat16
    dropped, common = _tensors(upcycled("t5", 1))
    assert not any(n.startswith("optimizer.") for n in dropped)
    assert "optimizer" not in common and "optimizer_step" not in common
    said = [line for line in upcycled.logs[("t5", 1)] if "--upcycle-optimizer drop" in line]
    assert len(said) == 1 and "Adam starts from zero" in said[0]


@pytest.mark.parametrize("model, k, layout", [
    ("gpt", 2, ["--nproc-per-node", "2", "--expert-model-parallel-size", "2"]),
    ("t5", 2, ["--nproc-per-node", "1"]),
], ids=["gpt-k2-replicate-ep2", "t5-k2-replicate-bf16"])
def test_training_continues_from_the_upcycled_checkpoint(upcycled, tmp_path, model, k, layout):
    """The trainer accepts the result with the printed flags, restores the replicated optimizer state and
    trains on with a finite loss."""
    path = upcycled(model, k)
    flags = _printed_flags(upcycled.logs[(model, k)], path)
    expected = ["--moe-switch", "--num-experts", str(EXPERTS), "--moe-layer-freq", str(k)]
    assert flags == expected + (["--switch-expert-activation", "gelu"] if model == "gpt" else [])
    lines = "\n".join(upcycled.logs[(model, k)])
    assert "--upcycle-optimizer replicate: each expert starts with its dense FFN's Adam moments" in lines
    iters = DENSE_ITERS[model]
    proc = run_train([*layout, *MODELS[model], *flags, "--train-iters", str(iters + 2), "--load", path,
                      "--plots-dir", str(tmp_path / "plots")], tmp_path)
    assert f"at iteration {iters}" in proc.stdout and "no optimizer state" not in proc.stdout
    m = metrics(tmp_path / "plots")
    assert [r["iteration"] for r in m] == [iters + 1, iters + 2]
    assert all(math.isfinite(r["lm_loss"]) and math.isfinite(r["grad_norm"]) for r in m)


def _leftovers(parent, name):
    return [p for p in os.listdir(parent) if p.startswith(name)]


def test_bad_requests_fail_with_their_fix_and_leave_nothing(dense, upcycled, tmp_path, capsys):
    cases = [
        (upcycled("gpt", 1), Upcycle(EXPERTS, 1), "already has expert layers"),
        (dense["gpt"], Upcycle(EXPERTS, 5), "--moe-layer-freq 5 puts no Switch layer in the 4-layer decoder.*"
                                            "use --moe-layer-freq 4 or less"),
        (dense["t5"], Upcycle(EXPERTS, 3), "use --moe-layer-freq 2 or less"),
    ]
    for load, upcycle, message in cases:  # the same checks on the tensors, for checkpoints without integrity.json
        reader = open_checkpoint(load)
        with pytest.raises(ConvertError, match=message):
            upcycle.wrap(reader, _quiet)
        reader.close()
    no_optim = str(tmp_path / "no-optim")
    convert(dense["gpt"], no_optim, no_optim=True, progress=False, log=_quiet)
    cases.append((no_optim, Upcycle(EXPERTS, 2, "replicate"), "holds no optimizer state.*leave --upcycle-optimizer"))
    for index, (load, upcycle, message) in enumerate(cases):
        with pytest.raises(ConvertError, match=message):
            convert(load, str(tmp_path / f"out{index}"), progress=False, log=_quiet, upcycle=upcycle)
        assert not _leftovers(tmp_path, f"out{index}")
    with pytest.raises(ConvertError, match="--num-experts must be >= 2"):
        Upcycle(1)
    for argv, message in [
        (["--upcycle", "--num-experts", "1"], "--num-experts must be >= 2"),
        (["--upcycle", "--num-experts", "4", "--moe-layer-freq", "0"], "--moe-layer-freq must be >= 1"),
        (["--upcycle-optimizer", "replicate"], "--upcycle-optimizer only apply with --upcycle"),
        (["--num-experts", "4"], "--num-experts only apply with --upcycle"),
        (["--upcycle"], "--upcycle needs --num-experts"),
        (["--upcycle", "--num-experts", "4", "--upcycle-optimizer", "replicate", "--no-optim"], "pass one of them"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["--load", dense["gpt"], "--save", str(tmp_path / "cli"), "--no-progress-bar", *argv])
        assert exit_.value.code == 1
        assert message in capsys.readouterr().err
        assert not _leftovers(tmp_path, "cli")
