"""Single-process Switch layer: against a slow per-token loop, a dense FFN, hand-computed losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_switch import SwitchConfig, SwitchMLP, switch_stats
from megatron_switch.router import load_balancing_loss, queue_positions, router_z_loss
from tests.helpers import count_expert_rows, counting_grouped_mm, dense_ffn, tiny_config
from tests.reference import slow_switch


def make_layer(switch: SwitchConfig, hidden=16, ffn=32, **config):
    return SwitchMLP(tiny_config(hidden=hidden, ffn=ffn, **config), switch=switch,
                     ep_group=None, tp_group=None)


def params(layer):
    e = layer.experts
    return layer.router.weight, e.weight1, e.weight2, e.bias1, e.bias2


def run_with_aux(layer, x, upstream):
    """Forward, then backward of sum(y * upstream) plus the attached aux losses."""
    y, bias = layer(x)
    assert bias is None
    (y * upstream).sum().backward()
    return y


@pytest.mark.parametrize("activation", ["relu", "gelu", "geglu", "swiglu"])
@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("capacity_factor,pad", [(1.0, False), (1.0, True), (None, False)],
                         ids=["kept-tokens", "padded", "dropless"])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_equals_slow_loop(activation, policy, capacity_factor, pad, bias):
    torch.manual_seed(0)
    switch = SwitchConfig(num_experts=4, capacity_factor=capacity_factor, min_capacity=1, pad_to_capacity=pad,
                          drop_policy=policy, activation=activation, expert_bias=bias,
                          aux_loss_coeff=1e-2, z_loss_coeff=1e-3, jitter_eps=0.0)
    layer = make_layer(switch)
    if bias:
        with torch.no_grad():
            layer.experts.bias1.normal_()
            layer.experts.bias2.normal_()
    x = torch.randn(6, 4, 16, requires_grad=True)
    upstream = torch.randn(6, 4, 16)
    y = run_with_aux(layer, x, upstream)

    ref_params = [None if p is None else p.detach().clone().requires_grad_() for p in params(layer)]
    x_ref = x.detach().clone().requires_grad_()
    capacity = switch.capacity(24, training=True)
    y_ref, loss_ref, kept, _ = slow_switch(x_ref.reshape(-1, 16), *ref_params, capacity=capacity,
                                           policy=policy, activation=activation,
                                           aux_coeff=1e-2, z_coeff=1e-3)
    ((y_ref.view(6, 4, 16) * upstream).sum() + loss_ref).backward()

    if capacity_factor is not None:
        assert (~kept).sum() > 0, "the case must drop tokens to test dropping"
    stats = layer.last_stats
    assert math.isclose(float(stats.dropped_fraction), float((~kept).float().mean()), abs_tol=1e-7)
    torch.testing.assert_close(y.view(-1, 16), y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.aux_loss + stats.z_loss, loss_ref.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for p, p_ref in zip(params(layer), ref_params):
        if p is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_one_expert_equals_dense_ffn(activation):
    torch.manual_seed(1)
    layer = make_layer(SwitchConfig(num_experts=1, capacity_factor=1.0, activation=activation,
                                    jitter_eps=0.0, aux_loss_coeff=0.0))
    x = torch.randn(5, 3, 16, requires_grad=True)
    upstream = torch.randn(5, 3, 16)
    y = run_with_aux(layer, x, upstream)
    assert float(layer.last_stats.dropped_fraction) == 0.0

    e = layer.experts
    w1, w2, b1, b2 = (t[0].detach().clone().requires_grad_() for t in (e.weight1, e.weight2, e.bias1, e.bias2))
    x_ref = x.detach().clone().requires_grad_()
    y_ref = dense_ffn(x_ref, w1, w2, b1, b2, activation)
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    for got, want in zip((e.weight1, e.weight2, e.bias1, e.bias2), (w1, w2, b1, b2)):
        torch.testing.assert_close(got.grad[0], want.grad, rtol=1e-6, atol=1e-6)


def test_aux_loss_matches_paper_formula_by_hand():
    # 4 tokens, 2 experts; argmax counts (3, 1) -> f = (0.75, 0.25);
    # probs rows (0.9, 0.1), (0.6, 0.4), (0.7, 0.3), (0.2, 0.8) -> P = (0.6, 0.4).
    # alpha * E * sum f_i P_i = 0.01 * 2 * (0.75 * 0.6 + 0.25 * 0.4) = 0.011
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    loss = load_balancing_loss(torch.tensor([3, 1]), probs.sum(0), 4, 0.01)
    assert math.isclose(float(loss), 0.011, rel_tol=1e-6)
    # Perfect balance gives alpha (the paper's minimum).
    uniform = load_balancing_loss(torch.tensor([2, 2]), torch.full((2,), 2.0), 4, 0.01)
    assert math.isclose(float(uniform), 0.01, rel_tol=1e-6)


def test_z_loss_by_hand_and_through_layer():
    # logits rows (0, 0) and (ln 3, 0): logsumexp = ln 2, ln 4; mean of squares.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = 1e-3 * (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    lse_sq = torch.logsumexp(logits, -1).square().sum()
    assert math.isclose(float(router_z_loss(lse_sq, 2, 1e-3)), expected, rel_tol=1e-6)

    layer = make_layer(SwitchConfig(num_experts=2, z_loss_coeff=1e-3, aux_loss_coeff=0.0, jitter_eps=0.0),
                       hidden=2)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    layer(torch.tensor([[0.0, 5.0], [math.log(3.0), 1.0]]).view(2, 1, 2))
    assert math.isclose(float(layer.last_stats.z_loss), expected, rel_tol=1e-6)


def test_aux_loss_reaches_router_gradient_without_changing_output():
    torch.manual_seed(2)
    layer = make_layer(SwitchConfig(num_experts=4, aux_loss_coeff=1.0, jitter_eps=0.0))
    x = torch.randn(8, 2, 16)
    y, _ = layer(x)
    y.sum().backward()
    with_aux = layer.router.weight.grad.clone()
    layer.zero_grad()
    layer.switch = layer.router.switch = SwitchConfig(num_experts=4, aux_loss_coeff=0.0, jitter_eps=0.0)
    y2, _ = layer(x)
    y2.sum().backward()
    torch.testing.assert_close(y, y2)
    assert not torch.allclose(with_aux, layer.router.weight.grad)


def test_jitter_touches_router_input_only():
    torch.manual_seed(3)
    layer = make_layer(SwitchConfig(num_experts=4, capacity_factor=None, jitter_eps=0.5))
    seen = {}
    layer.experts.register_forward_hook(lambda module, args, output: seen.update(x=args[0].detach().clone()))
    x = torch.randn(8, 2, 16)
    x_before = x.clone()
    y, _ = layer(x)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # input not modified in place
    # Every expert input row is an untouched input row (the jittered copy stays in the router).
    expert_rows = seen["x"]
    matches = (expert_rows[:, None, :] == x.view(-1, 16)[None, :, :]).all(-1).any(-1)
    assert matches.all() and expert_rows.shape[0] == 16
    # and jitter does change the router's logits
    layer.train()
    l1 = layer.router(x.view(-1, 16)).logsumexp
    l2 = layer.router(x.view(-1, 16)).logsumexp
    assert not torch.equal(l1, l2)
    layer.eval()
    torch.testing.assert_close(layer.router(x.view(-1, 16)).logsumexp,
                               layer.router(x.view(-1, 16)).logsumexp, rtol=0, atol=0)


def test_router_stays_float32_in_bf16_model(single_process_groups):
    from megatron.core.transformer.module import Float16Module

    config = tiny_config(bf16=True, params_dtype=torch.bfloat16)
    layer = SwitchMLP(config, switch=SwitchConfig(num_experts=4), ep_group=None, tp_group=None)
    wrapped = Float16Module(config, layer)
    assert layer.router.weight.dtype == torch.float32
    assert layer.experts.weight1.dtype == torch.bfloat16
    layer.bfloat16()
    layer.half()
    layer.bfloat16()
    assert layer.router.weight.dtype == torch.float32
    seen = {}

    def hook(module, inputs, routing):
        seen["logits"] = routing.logsumexp.dtype
        seen["gate"] = routing.gate.dtype

    layer.router.register_forward_hook(hook)
    layer.register_forward_hook(lambda module, inputs, out: seen.update(output=out[0].dtype))
    y, _ = wrapped(torch.randn(4, 2, 16))
    y.float().sum().backward()
    assert seen == {"logits": torch.float32, "gate": torch.float32, "output": torch.bfloat16}
    assert layer.router.weight.grad.dtype == torch.float32


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("capacity_factor", [1.0, None])
def test_no_tensor_of_size_tokens_x_experts_x_capacity(capacity_factor):
    T, h, ffn, E = 512, 8, 8, 64
    layer = make_layer(SwitchConfig(num_experts=E, capacity_factor=capacity_factor, min_capacity=1),
                       hidden=h, ffn=ffn)
    x = torch.randn(T, 1, h, requires_grad=True)
    C = layer.switch.capacity(T, True) or T
    with MaxNumel() as probe:
        y, _ = layer(x)
        y.sum().backward()
    bound = max(T * max(h, E), E * C * max(h, ffn), E * h * ffn) + E * C  # + trash row slack
    assert probe.largest <= bound < T * E * C // 4


def test_queue_positions_first_come_and_probs():
    expert = torch.tensor([1, 0, 1, 1, 0])
    gate = torch.tensor([0.2, 0.9, 0.8, 0.5, 0.3])
    assert queue_positions(expert, gate, 2, "position").tolist() == [0, 0, 1, 2, 1]
    assert queue_positions(expert, gate, 2, "probs").tolist() == [2, 0, 0, 1, 1]


def test_switch_stats_collects_every_layer():
    layer = make_layer(SwitchConfig(num_experts=4))
    model = torch.nn.Sequential(layer)
    layer(torch.randn(4, 2, 16))
    stats = switch_stats(model)
    assert list(stats) == [1]
    assert int(stats[1].tokens_per_expert.sum()) == 8


def test_gather_scale_with_no_kept_rows_gives_zeros_and_keeps_graph():
    from megatron_switch.dispatch import gather_scale

    gate = torch.rand(5, requires_grad=True)
    y = gather_scale(torch.empty(0, 3), torch.zeros(5, dtype=torch.long), gate)
    assert y.shape == (5, 3) and torch.count_nonzero(y) == 0
    y.sum().backward()
    assert torch.equal(gate.grad, torch.zeros(5))


def test_truncated_normal_init_scale_and_cut():
    from megatron_switch.initialization import switch_init_method

    w = torch.empty(512, 1024)
    switch_init_method(0.1)(w)
    sigma = math.sqrt(0.1 / 1024)
    assert w.abs().max() <= 2 * sigma
    # A normal cut at +-2 sigma has standard deviation 0.8796 sigma.
    assert abs(float(w.std()) / sigma - 0.8796) < 0.01
    layer = make_layer(SwitchConfig(num_experts=4, init_scale=0.1), hidden=64, ffn=256)
    for weight, fan_in in ((layer.experts.weight1, 64), (layer.experts.weight2, 256), (layer.router.weight, 64)):
        assert weight.abs().max() <= 2 * math.sqrt(0.1 / fan_in) + 1e-7
    # Expert e of a layer draws the same numbers wherever it lives (layout-independent init).
    other = SwitchMLP(tiny_config(hidden=64, ffn=256), switch=SwitchConfig(num_experts=4), ep_group=None,
                      tp_group=None)
    torch.testing.assert_close(other.experts.weight1, layer.experts.weight1, rtol=0, atol=0)


def test_expert_dropout_acts_inside_experts_in_training_only():
    torch.manual_seed(4)
    layer = make_layer(SwitchConfig(num_experts=2, capacity_factor=None, expert_dropout=0.5, jitter_eps=0.0))
    x = torch.randn(6, 2, 16)
    layer.eval()
    y_eval_1, _ = layer(x)
    y_eval_2, _ = layer(x)
    torch.testing.assert_close(y_eval_1, y_eval_2, rtol=0, atol=0)
    layer.train()
    y_train, _ = layer(x)
    assert not torch.allclose(y_train, y_eval_1)
    # Routing is untouched by expert dropout.
    assert torch.equal(layer.router(x.view(-1, 16)).expert, torch.argmax(x.view(-1, 16) @ layer.router.weight.t(), -1))


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "kept-tokens"])
def test_gradient_accumulation_fusion_accumulates_into_main_grad(pad):
    torch.manual_seed(5)
    switch = SwitchConfig(num_experts=4, capacity_factor=1.0, jitter_eps=0.0, pad_to_capacity=pad)
    plain = make_layer(switch)
    fused = SwitchMLP(tiny_config(gradient_accumulation_fusion=True), switch=switch, ep_group=None, tp_group=None)
    bank = (fused.experts.weight1, fused.experts.weight2)
    for w in bank:
        w.main_grad = torch.zeros_like(w)
        w.grad_added_to_main_grad = False
    x = torch.randn(6, 2, 16)
    for _ in range(2):  # two micro-batches accumulate
        for layer in (plain, fused):
            layer(x)[0].square().sum().backward()
    for w, ref in zip(bank, (plain.experts.weight1, plain.experts.weight2)):
        torch.testing.assert_close(w.main_grad, ref.grad, rtol=1e-5, atol=1e-6)
        assert w.grad_added_to_main_grad
    torch.testing.assert_close(fused.router.weight.grad, plain.router.weight.grad)


@pytest.mark.parametrize("pad,expected", [(True, "slots"), (False, "kept"), (None, "kept")])
def test_experts_compute_kept_tokens_unless_padding_to_capacity(pad, expected):
    """Without padding the expert GEMMs see exactly the kept tokens (the CPU default), with it every
    one of the E x C slots."""
    torch.manual_seed(6)
    switch = SwitchConfig(num_experts=4, capacity_factor=1.0, min_capacity=1, jitter_eps=0.0,
                          pad_to_capacity=pad)
    layer = make_layer(switch)
    rows = count_expert_rows(layer.experts)
    x = torch.randn(8, 3, 16)
    x[:, :, :] += 3 * layer.router.weight[0].detach()  # most tokens pick expert 0: many dropped
    layer(x)
    T = 24
    kept = round(T * (1 - float(layer.last_stats.dropped_fraction)))
    assert kept < T
    assert rows == [4 * switch.capacity(T, True) if expected == "slots" else kept]


def test_grouped_gemm_per_expert_fallback_matches_torch_grouped_mm():
    """Where torch._grouped_mm is not used (SwitchConfig.grouped_gemm False, or no kernel) the grouped
    projection runs one GEMM per expert: both give the same outputs and gradients, empty experts included."""
    import dataclasses

    from megatron_switch.experts import TorchExperts
    from megatron_switch.ops.projections import grouped_mm_fits

    torch.manual_seed(7)
    switch = SwitchConfig(num_experts=4, activation="swiglu")
    bank = TorchExperts(tiny_config(), switch, 4, 0)
    with torch.no_grad():
        bank.bias1.normal_()
        bank.bias2.normal_()
    counts = [5, 0, 7, 3]
    x = torch.randn(15, 16, requires_grad=True)
    upstream = torch.randn(15, 16)
    if not grouped_mm_fits(x, bank.weight1):
        pytest.skip("this torch has no CPU kernel for torch._grouped_mm")
    results = []
    with counting_grouped_mm() as grouped_calls:
        for native in (True, False):
            bank.switch = dataclasses.replace(switch, grouped_gemm=None if native else False)
            bank.zero_grad(set_to_none=True)
            x.grad = None
            (bank(x, counts) * upstream).sum().backward()
            results.append([x.grad] + [p.grad for p in bank.parameters()])
            # the native pass runs all 6 GEMMs (2 projections: forward, input and weight gradients) grouped
            assert len(grouped_calls) == 6, grouped_calls
    for native, fallback in zip(*results):
        torch.testing.assert_close(native, fallback, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(results[0][1][1]) == 0  # expert 1 had no token: no weight gradient


def _bank_gradients(bank, x, counts, upstream):
    bank.zero_grad(set_to_none=True)
    x.grad = None
    y = bank(x, counts)
    (y * upstream).sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in bank.parameters()]


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_grouped_rows_batched_to_the_largest_group_match_a_gemm_per_expert(activation):
    """On CPU (grouped_gemm None) grouped rows that pad by at most 30% run as a batch [E, m, h] through
    the batched GEMMs: the same outputs and gradients as a GEMM per expert, an empty expert included."""
    import dataclasses

    from megatron_switch.experts import TorchExperts
    from megatron_switch.ops import projections

    torch.manual_seed(8)
    switch = SwitchConfig(num_experts=8, activation=activation)
    bank = TorchExperts(tiny_config(), switch, 8, 0)
    with torch.no_grad():
        bank.bias1.normal_()
        bank.bias2.normal_()
    counts = [6, 6, 5, 6, 6, 6, 0, 6]  # 8 x 6 slots for 41 rows: batched
    assert projections.batched_slots(counts, torch.device("cpu")) is not None
    assert projections.batched_slots([6, 1, 1, 1, 1, 1, 1, 1], torch.device("cpu")) is None  # 48 slots, 13 rows
    x = torch.randn(sum(counts), 16, requires_grad=True)
    upstream = torch.randn(sum(counts), 16)
    with counting_grouped_mm() as grouped_calls:
        batched = _bank_gradients(bank, x, counts, upstream)
    assert grouped_calls == []
    bank.switch = dataclasses.replace(switch, grouped_gemm=False)
    per_expert = _bank_gradients(bank, x, counts, upstream)
    for a, b in zip(batched, per_expert):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(batched[2][6]) == 0  # expert 6 had no token: no weight gradient


@pytest.mark.parametrize("grouped_gemm", [None, False], ids=["batched", "per-expert"])
def test_kept_grads_accumulate_in_place_exactly_as_autograd_adds_them(grouped_gemm):
    """With .grad kept between steps the bank adds its weight gradients straight into .grad (no
    bank-sized temporary): the sums are those autograd's accumulation gives; torch.autograd.grad,
    backward(inputs=...) without the bank, and a post-accumulate hook all see what they would."""
    from megatron_switch.experts import TorchExperts

    torch.manual_seed(9)
    switch = SwitchConfig(num_experts=4, grouped_gemm=grouped_gemm)
    bank = TorchExperts(tiny_config(), switch, 4, 0)
    counts = [4, 3, 4, 4]
    xs = [torch.randn(15, 16, requires_grad=True) for _ in range(3)]
    expected = [torch.zeros_like(p) for p in bank.parameters()]
    for x in xs:  # the reference: each micro-batch's gradient alone, summed
        bank.zero_grad(set_to_none=True)
        bank(x, counts).square().sum().backward()
        for total, p in zip(expected, bank.parameters()):
            total += p.grad
    bank.zero_grad(set_to_none=True)
    for x in xs:  # kept .grad: the first micro-batch creates it, the others add into it
        bank(x, counts).square().sum().backward()
    for total, p in zip(expected, bank.parameters()):
        torch.testing.assert_close(p.grad, total, rtol=1e-6, atol=1e-6)

    before = [p.grad.clone() for p in bank.parameters()]
    grads = torch.autograd.grad(bank(xs[0], counts).square().sum(), [bank.weight1, xs[0]])
    bank(xs[1], counts).square().sum().backward(inputs=[xs[1]])
    for b, p in zip(before, bank.parameters()):
        assert torch.equal(p.grad, b)  # neither touched .grad
    bank.zero_grad(set_to_none=True)
    bank(xs[0], counts).square().sum().backward()
    torch.testing.assert_close(bank.weight1.grad, grads[0], rtol=1e-6, atol=1e-6)

    seen = []
    bank.weight2.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    bank.zero_grad(set_to_none=False)
    bank(xs[2], counts).square().sum().backward()
    assert len(seen) == 1
    bank.zero_grad(set_to_none=True)
    bank(xs[2], counts).square().sum().backward()
    torch.testing.assert_close(seen[0], bank.weight2.grad, rtol=1e-6, atol=1e-6)


class _ShapeCounter(TorchDispatchMode):
    """Counts the tensors of one shape that ops create (outputs that are not one of their inputs)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.created = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape and id(t) not in inputs \
                    and func is not torch.ops.aten.detach.default and not func.is_view:
                self.created += 1
        return out


@pytest.mark.parametrize("grads", ["none", "kept", "main_grad"])
@pytest.mark.parametrize("bias", [True, False])
def test_relu_bank_is_one_node_equal_to_two_projections_bit_for_bit(grads, bias):
    """A padded ReLU bank runs as one `BankReluFFN` node: outputs and every gradient (input, weights,
    biases; into None, kept .grad and main_grad) equal BankProjection -> F.relu -> BankProjection
    exactly, and it creates one [E, N, f] tensor forward and one backward where the two nodes create
    two and two; an input that needs no gradient gets none computed."""
    from megatron_switch.experts import TorchExperts
    from megatron_switch.ops.projections import BankProjection, BankReluFFN

    torch.manual_seed(11)
    E, N, f = 4, 6, 32
    bank = TorchExperts(tiny_config(gradient_accumulation_fusion=(grads == "main_grad")),
                        SwitchConfig(num_experts=E, expert_bias=bias), E, 0)
    assert bank._fused_relu()
    if bias:
        with torch.no_grad():
            bank.bias1.normal_()
            bank.bias2.normal_()
    x = torch.randn(E, N, 16, requires_grad=True)
    upstream = torch.randn(E, N, 16)
    weights = [p for p in (bank.weight1, bank.bias1, bank.weight2, bank.bias2) if p is not None]
    start = [torch.randn_like(p) for p in weights]

    def run(node):
        x.grad = None
        for p, s in zip(weights, start):
            p.grad = s.clone() if grads == "kept" else None
            if grads == "main_grad":
                p.main_grad, p.grad_added_to_main_grad = s.clone(), False
        counter = _ShapeCounter((E, N, f))
        with counter:
            y = node()
            created_forward = counter.created
            (y * upstream).sum().backward()
        found = [y, x.grad] + [p.main_grad if grads == "main_grad" and p.dim() == 3 else p.grad for p in weights]
        return found, (created_forward, counter.created - created_forward)

    fuse = grads == "main_grad"
    fused, fused_created = run(lambda: BankReluFFN.apply(x, bank.weight1, bank.bias1, bank.weight2, bank.bias2,
                                                         fuse))
    two, two_created = run(lambda: BankProjection.apply(torch.relu(BankProjection.apply(
        x, bank.weight1, bank.bias1, fuse)), bank.weight2, bank.bias2, fuse))
    for a, b in zip(fused, two):
        assert torch.equal(a, b)
    assert fused_created == (1, 1) and two_created == (2, 2)

    bank.zero_grad(set_to_none=True)
    frozen = x.detach()
    BankReluFFN.apply(frozen, bank.weight1, bank.bias1, bank.weight2, bank.bias2, False).sum().backward()
    assert frozen.grad is None and bank.weight1.grad is not None


def test_relu_bank_releases_its_activation_in_backward(monkeypatch):
    """The fused ReLU bank lets its activation go once ReLU's gradient is applied: the first projection's
    gradients run beside one [E, N, f] tensor (the activation's storage is freed by then), and a second
    backward through the same graph is refused by name instead of reading a freed activation."""
    import weakref

    from megatron_switch.experts import TorchExperts
    from megatron_switch.ops import projections

    torch.manual_seed(12)
    bank = TorchExperts(tiny_config(), SwitchConfig(num_experts=4), 4, 0)
    x = torch.randn(4, 6, 16, requires_grad=True)
    y = projections.BankReluFFN.apply(x, bank.weight1, bank.bias1, bank.weight2, bank.bias2, False)
    activation = weakref.ref(y.grad_fn.activation)
    alive_at_first_wgrad = []
    original = projections.bank_wgrad

    def watching(dy, inputs, weight, fuse):
        if weight is bank.weight1:
            alive_at_first_wgrad.append(activation() is not None)
        return original(dy, inputs, weight, fuse)

    monkeypatch.setattr(projections, "bank_wgrad", watching)
    y.sum().backward(retain_graph=True)
    assert alive_at_first_wgrad == [False]
    with pytest.raises(RuntimeError, match="backpropagate through it once"):
        y.sum().backward()


def test_grouped_kernel_adds_weight_gradients_in_runs_of_experts(monkeypatch):
    """Into an existing gradient (kept .grad, main_grad) torch._grouped_mm's result is added a run of
    experts at a time (at most WGRAD_CHUNK_BYTES of temporary, never the bank's size), empty experts
    included, with the sums a GEMM per expert gives."""
    from megatron_switch.ops import projections

    if not projections.grouped_mm_usable("cpu", torch.float32):
        pytest.skip("torch._grouped_mm has no CPU float32 kernel in this torch")
    torch.manual_seed(3)
    counts, (m, k) = [6, 0, 3, 5, 0, 2], (8, 16)
    a, b = torch.randn(sum(counts), m), torch.randn(sum(counts), k)
    start = torch.randn(len(counts), m, k)
    expected = start.clone()
    for g, (a_g, b_g) in enumerate(zip(a.split(counts), b.split(counts))):
        expected[g] += a_g.t() @ b_g
    for per_call, calls_expected in ((1, 4), (2 * m * k * 4, 3), (10**9, 1)):  # 1, 2, all experts per call
        monkeypatch.setattr(projections, "WGRAD_CHUNK_BYTES", per_call)
        out = start.clone()
        with counting_grouped_mm() as calls:
            projections.grouped_outer_mm_add_(out, a, b, counts)
        assert len(calls) == calls_expected  # runs without rows make no call
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_grouped_experts_without_tokens_stay_in_the_graph():
    """A rank whose experts receive no token (expert parallelism) still runs backward through its
    bank, with zero gradients, so it issues the same reductions as its peers."""
    from megatron_switch.experts import TorchExperts

    bank = TorchExperts(tiny_config(), SwitchConfig(num_experts=4), 4, 0)
    x = torch.empty(0, 16, requires_grad=True)
    y = bank(x, [0, 0, 0, 0])
    assert y.shape == (0, 16)
    y.sum().backward()
    for p in bank.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize("capacity_factor,pad", [(1.0, False), (1.0, True), (None, False)],
                         ids=["kept-tokens", "padded", "dropless"])
@pytest.mark.parametrize("z_coeff", [0.0, 1e-3])
def test_nonfinite_tokens_are_quarantined(capacity_factor, pad, z_coeff):
    """The rule: a token whose input holds NaN or inf takes no slot, outputs 0, and counts in neither
    the load fractions, the mean probabilities nor the z-loss; the other tokens route, compute and get
    gradients exactly as the slow loop over the finite tokens alone (capacity still from all T)."""
    torch.manual_seed(3)
    switch = SwitchConfig(num_experts=4, capacity_factor=capacity_factor, min_capacity=1, pad_to_capacity=pad,
                          aux_loss_coeff=1e-2, z_loss_coeff=z_coeff, jitter_eps=0.0)
    layer = make_layer(switch)
    x = torch.randn(6, 4, 16)
    bad = [0, 5, 17]  # flattened [s, b] rows: the first token (it would take a slot first), and two more
    flat = x.view(-1, 16)
    flat[0, 3], flat[5, 0], flat[17, 9] = float("nan"), float("inf"), float("-inf")
    x.requires_grad_()
    upstream = torch.randn(6, 4, 16)
    y = run_with_aux(layer, x, upstream)

    good = [t for t in range(24) if t not in bad]
    ref_params = [None if p is None else p.detach().clone().requires_grad_() for p in params(layer)]
    x_ref = x.detach().view(-1, 16)[good].clone().requires_grad_()
    y_ref, loss_ref, kept, _ = slow_switch(x_ref, *ref_params, capacity=switch.capacity(24, training=True),
                                           aux_coeff=1e-2, z_coeff=z_coeff)
    ((y_ref * upstream.view(-1, 16)[good]).sum() + loss_ref).backward()

    y_flat = y.view(-1, 16)
    assert torch.equal(y_flat[bad], torch.zeros(3, 16))
    torch.testing.assert_close(y_flat[good], y_ref, rtol=1e-5, atol=1e-6)
    stats = layer.last_stats
    assert int(stats.nonfinite_tokens) == 3 and int(stats.tokens_per_expert.sum()) == 21
    torch.testing.assert_close(stats.aux_loss + stats.z_loss, loss_ref.detach(), rtol=1e-6, atol=1e-8)
    if capacity_factor is not None:
        assert (~kept).sum() > 0  # finite tokens were dropped: the quarantined ones took no slot
        assert math.isclose(float(stats.dropped_fraction), float((~kept).sum()) / 24, abs_tol=1e-7)
    assert torch.equal(x.grad.view(-1, 16)[bad], torch.zeros(3, 16))
    torch.testing.assert_close(x.grad.view(-1, 16)[good], x_ref.grad, rtol=1e-5, atol=1e-6)
    for p, p_ref in zip(params(layer), ref_params):
        if p is not None:
            assert torch.isfinite(p.grad).all()
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6)
