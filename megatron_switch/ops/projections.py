"""The expert banks' projections as autograd functions: batched over padded slots, or grouped over
the kept tokens of each expert, with Megatron's gradient-accumulation fusion.

Shapes: E experts of a bank, N slots (padded) or rows (grouped), in/out the projection's widths.
- `BankProjection`: y[e] = x[e] @ w[e]^T (+ b[e]) for x [E, N, in] (one bmm / baddbmm).
- `GroupedProjection`: y_g = x_g @ w[g]^T (+ b[g]) for consecutive row groups of x [N, in], one
  group per expert: one `torch._grouped_mm` call where it is used, else a GEMM per expert.
Weight gradients come out in the weight's own [E, out, in] layout, or, with gradient-accumulation
fusion and a `main_grad` buffer (Megatron's DDP), are accumulated straight into it.

`grouped_mm_usable(device, dtype)` probes `torch._grouped_mm` once per device type and dtype with
exact small-integer operands in the three forms the projections use; whether a bank uses the kernel
is its config's choice (`SwitchConfig.grouped_gemm`, Megatron's --moe-grouped-gemm), never a global.
"""

from __future__ import annotations

import functools
import math
from typing import List

import torch


def wgrad_placeholder(weight: torch.Tensor):
    """What backward returns for a weight whose gradient went into `main_grad` (Megatron's contract)."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros_like(weight)
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)  # never written


class BankProjection(torch.autograd.Function):
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


@functools.lru_cache(maxsize=None)
def grouped_mm_usable(device_type: str, dtype: torch.dtype) -> bool:
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


def grouped_mm_fits(*operands: torch.Tensor) -> bool:
    """torch._grouped_mm's kernel wants non-empty operands of one dtype it takes on that device (the
    probe's answer), 16-byte aligned, with strides that are non-zero multiples of 16 bytes (but one of
    1 element)."""
    first = operands[0]
    return all(
        t.numel() > 0 and t.dtype == first.dtype and t.data_ptr() % 16 == 0
        and all(st > 0 and st * t.element_size() % 16 == 0 for st in t.stride() if st != 1)
        for t in operands) and grouped_mm_usable(first.device.type, first.dtype)


def _offsets(counts: List[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)


def grouped_rows_mm(rows_NK: torch.Tensor, mats_EKM: torch.Tensor, counts: List[int],
                    use_kernel: bool = True) -> torch.Tensor:
    """[N, K] rows in E consecutive groups of `counts` rows, [E, K, M] -> [N, M]: y_g = rows_g @ mats[g].
    use_kernel: torch._grouped_mm where it fits, else (or False) a GEMM per group."""
    if use_kernel and grouped_mm_fits(rows_NK, mats_EKM):
        return torch._grouped_mm(rows_NK, mats_EKM, offs=_offsets(counts, rows_NK.device))
    if rows_NK.shape[0] == 0:
        return rows_NK.new_empty(0, mats_EKM.shape[-1])
    return torch.cat([r @ m for r, m in zip(torch.split(rows_NK, counts), mats_EKM)])


def grouped_outer_mm(a_NM: torch.Tensor, b_NK: torch.Tensor, counts: List[int],
                     use_kernel: bool = True) -> torch.Tensor:
    """[N, M], [N, K] in E groups of `counts` rows -> [E, M, K]: out[g] = a_g^T @ b_g (zeros for an
    empty group): the weight gradient of a grouped projection."""
    if use_kernel and grouped_mm_fits(a_NM, b_NK):
        out = torch._grouped_mm(a_NM.t(), b_NK, offs=_offsets(counts, a_NM.device))
        for g in (g for g, count in enumerate(counts) if count == 0):
            out[g].zero_()  # (whatever the kernel leaves in an empty group's slot)
        return out
    return torch.stack([a.t() @ b for a, b in zip(torch.split(a_NM, counts), torch.split(b_NK, counts))])


class GroupedProjection(torch.autograd.Function):
    """y_g = x_g @ w[g]^T (+ b[g]) for the consecutive row groups g of x, one group per expert.

    Shapes: x [N, in] (rows sorted by expert, `counts[g]` rows for expert g), w [E, out, in],
    b [E, out] or None -> y [N, out]. The FLOPs are those of the N rows, whatever the capacity.
    The bias is added to the product (in bf16 after its rounding; the batched path fuses it), and its
    gradient is each group's sum, in order (deterministic, as F.linear's). Weight gradients as in
    `BankProjection` (into `main_grad` with gradient-accumulation fusion). use_kernel: whether
    `torch._grouped_mm` may be used (where it fits), else a GEMM per expert.
    """

    @staticmethod
    def forward(ctx, x_Ni, w_Eoi, b_Eo, counts, fuse_wgrad, use_kernel=True):
        y_No = grouped_rows_mm(x_Ni, w_Eoi.transpose(1, 2), counts, use_kernel)
        if b_Eo is not None:
            for y_no, b_o in zip(torch.split(y_No, counts), b_Eo):
                y_no += b_o
        ctx.save_for_backward(x_Ni, w_Eoi)
        ctx.counts, ctx.fuse_wgrad, ctx.has_bias, ctx.use_kernel = counts, fuse_wgrad, b_Eo is not None, use_kernel
        return y_No

    @staticmethod
    def backward(ctx, dy_No):
        x_Ni, w_Eoi = ctx.saved_tensors
        dy_No = dy_No.contiguous()
        dx = grouped_rows_mm(dy_No, w_Eoi, ctx.counts, ctx.use_kernel) if ctx.needs_input_grad[0] else None
        dw = db = None
        if ctx.needs_input_grad[1]:
            dw = _accumulated_wgrad(w_Eoi, grouped_outer_mm(dy_No, x_Ni, ctx.counts, ctx.use_kernel),
                                    ctx.fuse_wgrad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = torch.stack([dy_no.sum(0) for dy_no in torch.split(dy_No, ctx.counts)])
        return dx, dw, db, None, None, None
