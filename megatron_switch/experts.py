"""Expert banks: E_l local experts, each a two-layer FFN, computed in one batched GEMM per projection.

Weights are stacked per expert in the nn.Linear layout ([out, in]), so expert i of the bank is
`linear_fc1.weight = weight1[i]`, `linear_fc2.weight = weight2[i]` of a Megatron MLP:
  weight1 [E_l, f', h] (f' = 2f for gated activations, [gate; up] halves as in Megatron),
  weight2 [E_l, h, f], bias1 [E_l, f'], bias2 [E_l, h].
Two entry points: `forward_padded` for fixed capacity ([E_l, N, h], one bmm per projection) and
`forward_grouped` for variable token counts per expert ([N, h] sorted by expert: the kept tokens
only, one grouped GEMM per projection: `torch._grouped_mm` on the devices of `GROUPED_MM_DEVICES`
where it runs and multiplies correctly, else a GEMM per expert).

Backends (`--switch-expert-backend`): `torch` (this module; bf16/fp32 everywhere, FP8 through
`torch._scaled_mm` on GPUs of compute capability 8.9+, see fp8.py) and `te` (Transformer Engine's
GroupedLinear, experts_te.py, imported only when chosen). `resolve_expert_backend` decides, and
refuses what the machine cannot run, before any model is built; `build_experts` constructs the bank.
Both backends expose the same parameters by name (weight1, weight2, bias1, bias2), so checkpoints
move between them.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_switch.config import SwitchConfig, SwitchConfigError
from megatron_switch.fp8 import FP8_MULTIPLE, fp8_bank_linear, fp8_linear
from megatron_switch.initialization import seeded_generator, truncated_normal_

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "geglu": F.gelu, "swiglu": F.silu,
                "geglu_tanh": functools.partial(F.gelu, approximate="tanh")}


def expert_activation(h: torch.Tensor, switch: SwitchConfig, training: bool) -> torch.Tensor:
    """[..., f'] -> [..., f]: the expert nonlinearity (gated: act(gate) * up), then expert dropout."""
    activation = _ACTIVATIONS[switch.activation]
    if switch.gated:
        gate, up = torch.chunk(h, 2, dim=-1)
        h = activation(gate) * up
    else:
        h = activation(h)
    if switch.expert_dropout and training:  # (F.dropout with p = 0 still costs a pass over h)
        h = F.dropout(h, p=switch.expert_dropout, training=True)
    return h


def wgrad_placeholder(weight: torch.Tensor):
    """What backward returns for a weight whose gradient went into `main_grad` (Megatron's contract)."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros_like(weight)
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)  # never written


class _BankProjection(torch.autograd.Function):
    """y[e] = x[e] @ w[e]^T (+ b[e]) for every expert e of a bank.

    Shapes: x [E, N, in], w [E, out, in], b [E, out] or None -> y [E, N, out].
    The bias is fused into the GEMM (baddbmm). The weight gradient is produced in the weight's own
    [E, out, in] layout (autograd's bmm backward yields a transposed view that costs a copy of the
    whole bank), or, with gradient-accumulation fusion and a `main_grad` buffer (Megatron's DDP),
    accumulated straight into it, so no bank-sized gradient is allocated per step.
    """

    @staticmethod
    def forward(ctx, x_ENi, w_Eoi, b_Eo, fuse_wgrad):
        ctx.save_for_backward(x_ENi, w_Eoi)
        ctx.has_bias, ctx.fuse_wgrad = b_Eo is not None, fuse_wgrad
        if b_Eo is None:
            return torch.bmm(x_ENi, w_Eoi.transpose(1, 2))
        return torch.baddbmm(b_Eo[:, None, :], x_ENi, w_Eoi.transpose(1, 2))

    @staticmethod
    def backward(ctx, dy_ENo):
        x_ENi, w_Eoi = ctx.saved_tensors
        dx = torch.bmm(dy_ENo, w_Eoi) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            main_grad = getattr(w_Eoi, "main_grad", None) if ctx.fuse_wgrad else None
            if main_grad is not None and main_grad.dtype == dy_ENo.dtype:
                main_grad.baddbmm_(dy_ENo.transpose(1, 2), x_ENi)  # no bank-sized temporary
                dw = wgrad_placeholder(w_Eoi)
            else:
                dw = _accumulated_wgrad(w_Eoi, torch.bmm(dy_ENo.transpose(1, 2), x_ENi, out=torch.empty_like(w_Eoi)),
                                        ctx.fuse_wgrad)
        db = dy_ENo.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def _accumulated_wgrad(weight: torch.Tensor, dw: torch.Tensor, fuse_wgrad: bool):
    """dW as backward returns it: itself, or (gradient-accumulation fusion with a `main_grad`
    buffer, Megatron's DDP) added into main_grad, with the placeholder Megatron expects."""
    main_grad = getattr(weight, "main_grad", None) if fuse_wgrad else None
    if main_grad is None:
        return dw
    main_grad.add_(dw)
    return wgrad_placeholder(weight)


# Where the grouped projections use torch._grouped_mm (a GEMM per expert elsewhere). CUDA's kernel
# (bf16, Hopper) joins once tests/gpu/check.py (grouped_mm_cuda, which turns it on) has compared it
# with a GEMM per expert on a GPU.
GROUPED_MM_DEVICES = {"cpu"}


@functools.lru_cache(maxsize=None)
def _grouped_mm_runs_on(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` has a kernel for `dtype` operands on this device, and it multiplies
    correctly in the three forms the projections use: rows x row-major and x column-major [E, K, M]
    (backward and forward), and the weight-gradient form [K, N] x [N, M] grouped along N.
    torch 2.13's CPU kernel takes float32/bf16/fp16; CUDA's takes bf16 on Hopper (sm90+)."""
    if not hasattr(torch, "_grouped_mm"):
        return False

    def exact(*shape):  # small integers: every product and sum is exact, so any wrong index shows
        return (torch.arange(math.prod(shape), device=device_type) % 7 - 3).reshape(shape).to(dtype)

    def same(result, expected):
        return torch.equal(result.float().cpu(), expected.to(dtype).float().cpu())

    rows, other, mats = exact(3, 16), exact(3, 8), exact(2, 16, 16)
    counts = [1, 2]
    offsets = torch.tensor([1, 3], dtype=torch.int32, device=device_type)
    try:
        ok = True
        for mats_EKM in (mats, mats.transpose(1, 2)):
            expected = torch.cat([r.float() @ m.float() for r, m in zip(torch.split(rows, counts), mats_EKM)])
            ok &= same(torch._grouped_mm(rows, mats_EKM, offs=offsets), expected)
        expected = torch.stack([a.float().t() @ b.float()
                                for a, b in zip(torch.split(rows, counts), torch.split(other, counts))])
        return bool(ok and same(torch._grouped_mm(rows.t(), other, offs=offsets), expected))
    except (RuntimeError, NotImplementedError):  # no kernel here, or (CUDA) it failed to run
        return False


def _grouped_mm_fits(*operands: torch.Tensor) -> bool:
    """torch._grouped_mm's kernel wants non-empty operands of one dtype it takes on that device (the
    probe's answer), 16-byte aligned, with strides that are non-zero multiples of 16 bytes (but one of
    1 element)."""
    first = operands[0]
    return all(
        t.numel() > 0 and t.dtype == first.dtype and t.data_ptr() % 16 == 0
        and all(st > 0 and st * t.element_size() % 16 == 0 for st in t.stride() if st != 1)
        for t in operands) and first.device.type in GROUPED_MM_DEVICES \
        and _grouped_mm_runs_on(first.device.type, first.dtype)


def _offsets(counts: List[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)


def grouped_rows_mm(rows_NK: torch.Tensor, mats_EKM: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """[N, K] rows in E consecutive groups of `counts` rows, [E, K, M] -> [N, M]: y_g = rows_g @ mats[g]."""
    if _grouped_mm_fits(rows_NK, mats_EKM):
        return torch._grouped_mm(rows_NK, mats_EKM, offs=_offsets(counts, rows_NK.device))
    if rows_NK.shape[0] == 0:
        return rows_NK.new_empty(0, mats_EKM.shape[-1])
    return torch.cat([r @ m for r, m in zip(torch.split(rows_NK, counts), mats_EKM)])


def grouped_outer_mm(a_NM: torch.Tensor, b_NK: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """[N, M], [N, K] in E groups of `counts` rows -> [E, M, K]: out[g] = a_g^T @ b_g (zeros for an
    empty group): the weight gradient of a grouped projection."""
    if _grouped_mm_fits(a_NM, b_NK):
        out = torch._grouped_mm(a_NM.t(), b_NK, offs=_offsets(counts, a_NM.device))
        for g in (g for g, count in enumerate(counts) if count == 0):
            out[g].zero_()  # (whatever the kernel leaves in an empty group's slot)
        return out
    return torch.stack([a.t() @ b for a, b in zip(torch.split(a_NM, counts), torch.split(b_NK, counts))])


class _GroupedProjection(torch.autograd.Function):
    """y_g = x_g @ w[g]^T (+ b[g]) for the consecutive row groups g of x, one group per expert.

    Shapes: x [N, in] (rows sorted by expert, `counts[g]` rows for expert g), w [E, out, in],
    b [E, out] or None -> y [N, out]. The FLOPs are those of the N rows, whatever the capacity.
    The bias is added to the product (in bf16 after its rounding; the batched path fuses it), and its
    gradient is each group's sum, in order (deterministic, as F.linear's). Weight gradients as in
    `_BankProjection` (into `main_grad` with gradient-accumulation fusion).
    """

    @staticmethod
    def forward(ctx, x_Ni, w_Eoi, b_Eo, counts, fuse_wgrad):
        y_No = grouped_rows_mm(x_Ni, w_Eoi.transpose(1, 2), counts)
        if b_Eo is not None:
            for y_no, b_o in zip(torch.split(y_No, counts), b_Eo):
                y_no += b_o
        ctx.save_for_backward(x_Ni, w_Eoi)
        ctx.counts, ctx.fuse_wgrad, ctx.has_bias = counts, fuse_wgrad, b_Eo is not None
        return y_No

    @staticmethod
    def backward(ctx, dy_No):
        x_Ni, w_Eoi = ctx.saved_tensors
        dy_No = dy_No.contiguous()
        dx = grouped_rows_mm(dy_No, w_Eoi, ctx.counts) if ctx.needs_input_grad[0] else None
        dw = db = None
        if ctx.needs_input_grad[1]:
            dw = _accumulated_wgrad(w_Eoi, grouped_outer_mm(dy_No, x_Ni, ctx.counts), ctx.fuse_wgrad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = torch.stack([dy_no.sum(0) for dy_no in torch.split(dy_No, ctx.counts)])
        return dx, dw, db, None, None


def expert_ffn_size(config: TransformerConfig, switch: SwitchConfig) -> int:
    return switch.expert_ffn_hidden_size or config.ffn_hidden_size


@functools.lru_cache(maxsize=None)
def transformer_engine_import_error() -> Optional[str]:
    """None when transformer_engine.pytorch imports, else why it does not."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # ImportError, or a driver/library error raised at import
        return f"{type(err).__name__}: {err}"
    return None


FP8_MIN_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell: FP8 tensor cores


def resolve_expert_backend(switch: SwitchConfig) -> str:
    """"torch" or "te" for this machine, or SwitchConfigError saying what to use instead.

    auto: torch (te only when asked for: it has not been run anywhere yet). FP8 on the torch
    backend needs a CUDA GPU of compute capability 8.9+ and the tensorwise recipe; the other
    recipes need te.
    """
    cuda = torch.cuda.is_available()
    backend = switch.expert_backend
    if backend == "auto":
        backend = "torch"
    if backend == "te":
        if not cuda:
            raise SwitchConfigError(
                "--switch-expert-backend te needs CUDA: Transformer Engine cannot build a module without a "
                "GPU, and this machine has none. Use --switch-expert-backend torch (or auto).")
        problem = transformer_engine_import_error()
        if problem is not None:
            raise SwitchConfigError(
                f"--switch-expert-backend te: Transformer Engine does not import ({problem}). Install it in "
                "a CUDA image (pip install 'megatron-switch[te]', or use an NGC PyTorch container), or use "
                "--switch-expert-backend torch.")
        if switch.fp8_format is not None:
            from megatron_switch.experts_te import te_fp8_recipe

            te_fp8_recipe(switch.fp8_format, switch.fp8_recipe or "delayed")  # raises if unsupported
        return "te"
    if switch.fp8_format is not None:
        recipe = switch.fp8_recipe or "tensorwise"
        if recipe != "tensorwise":
            raise SwitchConfigError(
                f"--fp8-recipe {recipe}: the torch expert backend scales FP8 per tensor (--fp8-recipe "
                "tensorwise); delayed, blockwise and mxfp8 need --switch-expert-backend te.")
        if not cuda:
            raise SwitchConfigError(
                f"--fp8-format {switch.fp8_format} needs a GPU with FP8 tensor cores (compute capability "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+: Ada, Hopper, Blackwell) and this "
                "machine has no CUDA device. Drop --fp8-format to run the experts in bf16/fp32.")
        capability = torch.cuda.get_device_capability()
        if capability < FP8_MIN_CAPABILITY:
            raise SwitchConfigError(
                f"--fp8-format {switch.fp8_format}: {torch.cuda.get_device_name()} (compute capability "
                f"{capability[0]}.{capability[1]}) has no FP8 tensor cores; drop --fp8-format (bf16 experts).")
    return "torch"


def check_fp8_shapes(hidden: int, ffn: int, switch: SwitchConfig) -> None:
    """FP8 GEMMs need both weight dimensions to be multiples of 16."""
    if switch.fp8_format is None:
        return
    for name, size in (("--hidden-size", hidden), ("the expert FFN width", ffn)):
        if size % FP8_MULTIPLE:
            raise SwitchConfigError(
                f"--fp8-format needs {name} to be a multiple of {FP8_MULTIPLE}, got {size}")


def build_experts(config: TransformerConfig, switch: SwitchConfig, num_local_experts: int,
                  first_expert: int, layer_number: int = 1) -> MegatronModule:
    """The expert bank of the backend `resolve_expert_backend` picks for this machine."""
    check_fp8_shapes(config.hidden_size, expert_ffn_size(config, switch), switch)
    if resolve_expert_backend(switch) == "te":
        from megatron_switch.experts_te import TEExperts

        return TEExperts(config, switch, num_local_experts, first_expert, layer_number)
    return TorchExperts(config, switch, num_local_experts, first_expert, layer_number)


class ExpertBank(MegatronModule):
    """What every expert backend shares: the bank's place among the experts, its widths, the
    activation, and the layout-independent draw of expert e's weights."""

    def __init__(self, config: TransformerConfig, switch: SwitchConfig, num_local_experts: int,
                 first_expert: int):
        super().__init__(config=config)
        self.switch = switch
        self.num_local_experts = num_local_experts
        self.first_expert = first_expert
        self.ffn = expert_ffn_size(config, switch)
        self.fc1_out = 2 * self.ffn if switch.gated else self.ffn

    def _ffn_tail(self, h: torch.Tensor) -> torch.Tensor:
        return expert_activation(h, self.switch, self.training)

    def _draw(self, weight: torch.Tensor, layer_number: int, tensor_id: int, local: int) -> None:
        """Expert (first_expert + local) of layer L draws the same weights whatever the layout."""
        generator = seeded_generator(self.switch.init_seed, layer_number, tensor_id, self.first_expert + local)
        truncated_normal_(weight, self.switch.init_scale, generator=generator)


class TorchExperts(ExpertBank):
    """The `torch` expert backend: bf16/fp32 batched GEMMs on any device; FP8 GEMMs (one per expert
    and projection, `torch._scaled_mm`) when `switch.fp8_format` is set."""

    def __init__(self, config: TransformerConfig, switch: SwitchConfig, num_local_experts: int,
                 first_expert: int, layer_number: int = 1):
        super().__init__(config, switch, num_local_experts, first_expert)
        ffn, fc1_out = self.ffn, self.fc1_out
        hidden, dtype = config.hidden_size, config.params_dtype
        self.weight1 = torch.nn.Parameter(torch.empty(num_local_experts, fc1_out, hidden, dtype=dtype))
        self.weight2 = torch.nn.Parameter(torch.empty(num_local_experts, hidden, ffn, dtype=dtype))
        if switch.expert_bias:
            self.bias1 = torch.nn.Parameter(torch.zeros(num_local_experts, fc1_out, dtype=dtype))
            self.bias2 = torch.nn.Parameter(torch.zeros(num_local_experts, hidden, dtype=dtype))
        else:
            self.bias1 = self.bias2 = None
        for param in self.parameters():
            param.allreduce = False  # Megatron DDP: reduce over the expert-data-parallel group
        self.reset_parameters(layer_number)

    def reset_parameters(self, layer_number: int) -> None:
        """Expert e of layer L draws the same weights whatever the parallel layout."""
        if not self.config.perform_initialization:
            return
        for tensor_id, weight in ((1, self.weight1), (2, self.weight2)):
            for local in range(self.num_local_experts):
                self._draw(weight[local], layer_number, tensor_id, local)

    def _fp8_expert(self, x_nh: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e of the bank on its tokens [n, h] -> [n, h], its GEMMs in FP8."""
        linear = functools.partial(fp8_linear, fp8_format=self.switch.fp8_format)
        h = linear(x_nh, self.weight1[e], None if self.bias1 is None else self.bias1[e])
        return linear(self._ffn_tail(h), self.weight2[e], None if self.bias2 is None else self.bias2[e])

    def _project(self, x_ENi: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """One projection of the whole bank: FP8 GEMMs when fp8_format is set, else batched GEMMs."""
        if self.switch.fp8_format:
            return fp8_bank_linear(x_ENi, weight, bias, self.switch.fp8_format)
        return _BankProjection.apply(x_ENi, weight, bias, self.config.gradient_accumulation_fusion)

    def forward_padded(self, x_ENh: torch.Tensor) -> torch.Tensor:
        """[E_l, N, h] -> [E_l, N, h]: every expert gets the same number N of token slots."""
        h = self._project(x_ENh, self.weight1, self.bias1)
        return self._project(self._ffn_tail(h), self.weight2, self.bias2)

    def forward_grouped(self, x_Nh: torch.Tensor, tokens_per_expert: List[int]) -> torch.Tensor:
        """[N, h] sorted by local expert, with counts per expert -> [N, h]."""
        # Empty groups run too: every expert stays in the autograd graph on every rank, so each
        # rank's backward issues the same collectives even when its experts received no token.
        if self.switch.fp8_format:
            outputs = [self._fp8_expert(x_nh, e) for e, x_nh in enumerate(torch.split(x_Nh, tokens_per_expert))]
            return torch.cat(outputs) if outputs else x_Nh
        fuse = self.config.gradient_accumulation_fusion
        h = _GroupedProjection.apply(x_Nh, self.weight1, self.bias1, tokens_per_expert, fuse)
        return _GroupedProjection.apply(self._ffn_tail(h), self.weight2, self.bias2, tokens_per_expert, fuse)
