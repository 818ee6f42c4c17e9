"""The expert banks' projections as autograd functions: batched over padded slots, or grouped over
the kept tokens of each expert, with Megatron's gradient-accumulation fusion.

Shapes: E experts of a bank, N slots (padded) or rows (grouped), in/out the projection's widths.
- `BankProjection`: y[e] = x[e] @ w[e]^T (+ b[e]) for x [E, N, in] (one bmm / baddbmm).
- `BankReluFFN`: both projections of a ReLU bank around the activation, in one node (ReLU in place).
- `GroupedProjection`: y_g = x_g @ w[g]^T (+ b[g]) for consecutive row groups of x [N, in], one
  group per expert: one `torch._grouped_mm` call where it is used, else a GEMM per expert.
- `batched_slots` / `rows_to_slots` / `slots_to_rows`: grouped rows laid out as a batch [E, m, in]
  (m = the largest group, zero rows below the smaller ones), so a bank can run its grouped input
  through the batched GEMMs: on CPUs one batched GEMM is several times faster than a GEMM per small
  group (torch 2.13's CPU `torch._grouped_mm` is such a loop), for at most `BATCHED_PAD_LIMIT` x the rows.
Weight gradients never pass through a bank-sized temporary when there is somewhere to add them:
with gradient-accumulation fusion and a `main_grad` buffer (Megatron's DDP) they are accumulated
straight into it; into an existing `.grad` that autograd would add them to (gradients kept between
steps or accumulated over micro-batches) likewise (`wgrad_destination`). Otherwise they come out in
the weight's own [E, out, in] layout.

`grouped_mm_usable(device, dtype)` probes `torch._grouped_mm` once per device type and dtype with
exact small-integer operands in the three forms the projections use; whether a bank uses the kernel
is its config's choice (`SwitchConfig.grouped_gemm`, Megatron's --moe-grouped-gemm), never a global.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import List, Optional

import torch


def wgrad_placeholder(weight: torch.Tensor):
    """What backward returns for a weight whose gradient went into `main_grad` (Megatron's contract)."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros_like(weight)
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)  # never written


def _grad_autograd_would_add_to(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """weight.grad, when the running backward is about to add this weight's gradient into it and
    adding it there directly is the same thing: a plain strided `.grad` of the weight's dtype exists,
    no graph is being built (create_graph), no hook on the weight would see the gradient first or
    be owed a call after it, and the engine will run the weight's AccumulateGrad (not
    `torch.autograd.grad`, not `backward(inputs=...)` without it). Else None."""
    grad = weight.grad
    if (grad is None or torch.is_grad_enabled() or not weight.is_leaf or type(grad) is not torch.Tensor
            or grad.layout != torch.strided or grad.dtype != weight.dtype or grad.shape != weight.shape
            or not grad.is_contiguous() or weight._backward_hooks or weight._post_accumulate_grad_hooks):
        return None
    try:
        node = torch.autograd.graph.get_gradient_edge(weight).node
        return grad if torch._C._will_engine_execute_node(node) else None
    except RuntimeError:  # (torch.autograd.grad: it captures the gradient and accumulates nothing)
        return None


def wgrad_destination(weight: torch.Tensor, fuse_wgrad: bool, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Where a weight gradient computed in `dtype` can be added in place, or None (return it):
    `main_grad` with gradient-accumulation fusion (Megatron's DDP), else an existing `.grad` that
    autograd would add it to. Pass what was added there to `wgrad_added` for backward's return value."""
    main_grad = getattr(weight, "main_grad", None) if fuse_wgrad else None
    if main_grad is not None:
        return main_grad if main_grad.dtype == dtype else None
    return _grad_autograd_would_add_to(weight)


def wgrad_added(weight: torch.Tensor, destination: torch.Tensor):
    """backward's return value for a weight whose gradient was added into `destination` in place:
    Megatron's placeholder for main_grad, None for .grad (nothing left for autograd to add)."""
    return None if destination is weight.grad else wgrad_placeholder(weight)


def bank_mm(x_ENi: torch.Tensor, w_Eoi: torch.Tensor, b_Eo: Optional[torch.Tensor]) -> torch.Tensor:
    """x[e] @ w[e]^T (+ b[e]) for every e: one bmm, or one baddbmm with the bias fused."""
    if b_Eo is None:
        return torch.bmm(x_ENi, w_Eoi.transpose(1, 2))
    return torch.baddbmm(b_Eo[:, None, :], x_ENi, w_Eoi.transpose(1, 2))


def bank_dgrad(dy_ENo: torch.Tensor, w_Eoi: torch.Tensor) -> torch.Tensor:
    """dx[e] = dy[e] @ w[e]: a bank projection's input gradient (one bmm)."""
    return torch.bmm(dy_ENo, w_Eoi)


def relu_(h: torch.Tensor) -> torch.Tensor:
    """ReLU in place (h is the caller's own buffer)."""
    return h.relu_()


def relu_backward_(grad: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """ReLU's gradient applied in place to `grad` (the caller's own buffer), from the activation
    relu(h): zero where it is 0, as F.relu's backward (threshold_backward) gives."""
    return torch.ops.aten.threshold_backward.grad_input(grad, activation, 0, grad_input=grad)


class BankProjection(torch.autograd.Function):
    """y[e] = x[e] @ w[e]^T (+ b[e]) for every expert e of a bank.

    Shapes: x [E, N, in], w [E, out, in], b [E, out] or None -> y [E, N, out].
    The bias is fused into the GEMM (baddbmm). The weight gradient is added in place (baddbmm_) into
    `main_grad` (gradient-accumulation fusion, Megatron's DDP) or into the `.grad` autograd would
    add it to (`wgrad_destination`), so no bank-sized gradient is allocated per step; otherwise it
    is produced in the weight's own [E, out, in] layout (autograd's bmm backward yields a transposed
    view that costs a copy of the whole bank).
    """

    @staticmethod
    def forward(ctx, x_ENi, w_Eoi, b_Eo, fuse_wgrad):
        ctx.save_for_backward(x_ENi, w_Eoi)
        ctx.has_bias, ctx.fuse_wgrad = b_Eo is not None, fuse_wgrad
        return bank_mm(x_ENi, w_Eoi, b_Eo)

    @staticmethod
    def backward(ctx, dy_ENo):
        x_ENi, w_Eoi = ctx.saved_tensors
        dx = bank_dgrad(dy_ENo, w_Eoi) if ctx.needs_input_grad[0] else None
        dw = bank_wgrad(dy_ENo, x_ENi, w_Eoi, ctx.fuse_wgrad) if ctx.needs_input_grad[1] else None
        db = dy_ENo.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


class BankReluFFN(torch.autograd.Function):
    """y[e] = relu(x[e] @ w1[e]^T (+ b1[e])) @ w2[e]^T (+ b2[e]) for every expert e of a bank, one node.

    Shapes: x [E, N, h], w1 [E, f, h], b1 [E, f] or None, w2 [E, h, f], b2 [E, h] or None -> [E, N, h].
    The same GEMMs as two `BankProjection`s around F.relu, with the same results bit for bit, but
    ReLU and its gradient run in place on buffers this node owns (the first product forward, the
    second's input gradient backward), so neither allocates a tensor of its own: on CPUs each fresh
    [E, N, f] tensor costs a round of page faults about as long as the ReLU itself. Saves x and the
    activation, as the two nodes do, but lets the activation go inside backward once its last use
    (ReLU's gradient) is done, so the first projection's gradients run beside one [E, N, f] tensor,
    as after the two nodes; hence a graph through it can be backpropagated once (no retain_graph).
    Weight gradients as in `BankProjection` (`bank_wgrad`).
    """

    @staticmethod
    def forward(ctx, x_ENh, w1_Efh, b1_Ef, w2_Ehf, b2_Eh, fuse_wgrad):
        a_ENf = relu_(bank_mm(x_ENh, w1_Efh, b1_Ef))
        ctx.save_for_backward(x_ENh, w1_Efh, w2_Ehf)
        ctx.activation = a_ENf  # an intermediate (neither input nor output), released in backward
        ctx.has_bias1, ctx.has_bias2, ctx.fuse_wgrad = b1_Ef is not None, b2_Eh is not None, fuse_wgrad
        return bank_mm(a_ENf, w2_Ehf, b2_Eh)

    @staticmethod
    def backward(ctx, dy_ENh):
        x_ENh, w1_Efh, w2_Ehf = ctx.saved_tensors
        a_ENf, ctx.activation = ctx.activation, None
        if a_ENf is None:
            raise RuntimeError("BankReluFFN releases its activation in backward: backpropagate through it "
                               "once (run the forward again instead of retain_graph=True)")
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        dw2 = bank_wgrad(dy_ENh, a_ENf, w2_Ehf, ctx.fuse_wgrad) if need_w2 else None
        db2 = dy_ENh.sum(1) if ctx.has_bias2 and need_b2 else None
        if not (need_x or need_w1 or need_b1):
            return None, None, None, dw2, db2, None
        da_ENf = relu_backward_(bank_dgrad(dy_ENh, w2_Ehf), a_ENf)
        del a_ENf  # its last use: the first projection's gradients need only da
        dx = bank_dgrad(da_ENf, w1_Efh) if need_x else None
        dw1 = bank_wgrad(da_ENf, x_ENh, w1_Efh, ctx.fuse_wgrad) if need_w1 else None
        db1 = da_ENf.sum(1) if ctx.has_bias1 and need_b1 else None
        return dx, dw1, db1, dw2, db2, None


def bank_wgrad(dy_ENo: torch.Tensor, x_ENi: torch.Tensor, weight: torch.Tensor, fuse_wgrad: bool):
    """dW[e] = dy[e]^T @ x[e] as backward returns it: added in place where `wgrad_destination` finds
    somewhere (one baddbmm_, no bank-sized temporary), else a new [E, out, in] tensor."""
    destination = wgrad_destination(weight, fuse_wgrad, dy_ENo.dtype)
    if destination is not None:
        destination.baddbmm_(dy_ENo.transpose(1, 2), x_ENi)
        return wgrad_added(weight, destination)
    return _accumulated_wgrad(weight, torch.bmm(dy_ENo.transpose(1, 2), x_ENi, out=torch.empty_like(weight)),
                              fuse_wgrad)


def _accumulated_wgrad(weight: torch.Tensor, dw: torch.Tensor, fuse_wgrad: bool):
    """dW as backward returns it: itself, or (gradient-accumulation fusion with a `main_grad`
    buffer of another dtype) added into main_grad, with the placeholder Megatron expects."""
    main_grad = getattr(weight, "main_grad", None) if fuse_wgrad else None
    if main_grad is None:
        return dw
    main_grad.add_(dw)
    return wgrad_placeholder(weight)


BATCHED_PAD_LIMIT = 1.3  # batched slots E x m may exceed the rows N by this factor at most


def batched_slots(counts: List[int], device: torch.device) -> Optional[torch.Tensor]:
    """[N] slot of each grouped row in a batch [E, m] (m = max(counts); group g's rows fill the first
    counts[g] slots of batch g), or None when that batch would hold more than BATCHED_PAD_LIMIT x N
    slots (or there are no rows): then the groups are better computed as they are.
    Measured on CPU (2 threads, h=512, ffn=2048, ~4k rows): one batched GEMM is ~1.1x (8 groups of
    ~500 rows) to ~3x (64 groups of ~60 rows) faster per row than a GEMM per group."""
    num_rows, m = sum(counts), max(counts, default=0)
    if num_rows == 0 or len(counts) * m > BATCHED_PAD_LIMIT * num_rows:
        return None
    counts_E = torch.tensor(counts, device=device)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    shift_E = torch.arange(len(counts), device=device) * m - starts_E
    return torch.arange(num_rows, device=device) + torch.repeat_interleave(shift_E, counts_E, output_size=num_rows)


class _RowsToSlots(torch.autograd.Function):
    """rows [N, k], slot [N] -> [S, k]: out[slot[i]] = rows[i], zeros in the other slots.
    Backward gathers (no scatter-add: each slot holds at most one row)."""

    @staticmethod
    def forward(ctx, rows_Nk, slot_N, num_slots):
        ctx.save_for_backward(slot_N)
        return rows_Nk.new_zeros(num_slots, rows_Nk.shape[1]).index_copy_(0, slot_N, rows_Nk)

    @staticmethod
    def backward(ctx, d_Sk):
        (slot_N,) = ctx.saved_tensors
        return d_Sk.index_select(0, slot_N), None, None


class _SlotsToRows(torch.autograd.Function):
    """slots [S, k], slot [N] -> rows [N, k] = slots[slot]; backward copies back (zeros elsewhere)."""

    @staticmethod
    def forward(ctx, slots_Sk, slot_N):
        ctx.save_for_backward(slot_N)
        ctx.num_slots = slots_Sk.shape[0]
        return slots_Sk.index_select(0, slot_N)

    @staticmethod
    def backward(ctx, d_Nk):
        (slot_N,) = ctx.saved_tensors
        return d_Nk.new_zeros(ctx.num_slots, d_Nk.shape[1]).index_copy_(0, slot_N, d_Nk), None


def rows_to_slots(rows_Nk: torch.Tensor, slot_N: torch.Tensor, num_experts: int, m: int) -> torch.Tensor:
    """Grouped rows [N, k] -> batch [E, m, k] at `batched_slots`' slots (zero rows elsewhere)."""
    return _RowsToSlots.apply(rows_Nk, slot_N, num_experts * m).view(num_experts, m, rows_Nk.shape[1])


def slots_to_rows(slots_Emk: torch.Tensor, slot_N: torch.Tensor) -> torch.Tensor:
    """Batch [E, m, k] -> the grouped rows [N, k] at `batched_slots`' slots."""
    return _SlotsToRows.apply(slots_Emk.reshape(-1, slots_Emk.shape[-1]), slot_N)


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


WGRAD_CHUNK_BYTES = 32 * 2**20  # the largest temporary `grouped_outer_mm_add_` makes with the kernel


def grouped_outer_mm_add_(out_EMK: torch.Tensor, a_NM: torch.Tensor, b_NK: torch.Tensor, counts: List[int],
                          use_kernel: bool = True) -> None:
    """out[g] += a_g^T @ b_g in place (`grouped_outer_mm` accumulated): one GEMM per group adding into
    its slice, or torch._grouped_mm's result added (the kernel has no accumulating form) for runs of
    groups whose result fits in WGRAD_CHUNK_BYTES: never a temporary the size of the bank."""
    if use_kernel and grouped_mm_fits(a_NM, b_NK):
        per_group = out_EMK[0].numel() * out_EMK.element_size()
        step = max(1, WGRAD_CHUNK_BYTES // per_group)
        starts = [0, *itertools.accumulate(counts)]
        for g in range(0, len(counts), step):
            last = min(g + step, len(counts))
            rows = slice(starts[g], starts[last])
            if rows.stop > rows.start:
                out_EMK[g:last].add_(grouped_outer_mm(a_NM[rows], b_NK[rows], counts[g:last], use_kernel))
        return
    for out_MK, a, b in zip(out_EMK, torch.split(a_NM, counts), torch.split(b_NK, counts)):
        if a.shape[0]:
            out_MK.addmm_(a.t(), b)


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
            destination = wgrad_destination(w_Eoi, ctx.fuse_wgrad, dy_No.dtype)
            if destination is None:
                dw = _accumulated_wgrad(w_Eoi, grouped_outer_mm(dy_No, x_Ni, ctx.counts, ctx.use_kernel),
                                        ctx.fuse_wgrad)
            else:
                grouped_outer_mm_add_(destination, dy_No, x_Ni, ctx.counts, ctx.use_kernel)
                dw = wgrad_added(w_Eoi, destination)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = torch.stack([dy_no.sum(0) for dy_no in torch.split(dy_No, ctx.counts)])
        return dx, dw, db, None, None, None
