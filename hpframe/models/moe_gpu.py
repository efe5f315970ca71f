"""The GPU fast path of the MoE layer: token permutation, grouped SwiGLU, un-permutation + combine.

Single-device code (no torch.distributed). Shape legend: T tokens, H hidden, k top_k, E experts,
F expert inner size, N = T*k assignments (dropless: every assignment kept). An assignment id is
a = t*k + j. ``order[N]`` lists assignment ids grouped by expert (``sort_by_expert``); ``inv[N]``
is its inverse: row ``inv[a]`` of the expert-sorted tensors holds assignment a.

What it changes against the generic path in ``moe.py`` (same function, fewer passes over memory):
  permute   x_sorted = x[order // k]; backward gathers the k gradient rows of each token and sums
            them in fp32 (deterministic) instead of an atomic index_put.
  order     a counting sort (two Triton kernels) gives the order, its inverse and the per-expert counts
            at once, in place of a radix sort, a scatter and torch.bincount (which syncs with the host
            on CUDA).
  experts   torch._grouped_mm on the unpadded rows: the group offsets need no 16-row alignment
            (only the base pointers and strides do, which [N,H] row-major tensors with H % 8 == 0
            satisfy), so the scatter into a padded buffer and the gather back are gone. The gate and
            up projections are one grouped GEMM on the packed w13; SwiGLU is one Triton kernel each
            way that reads the packed [N,2F] output and keeps it alone for backward.
  combine   y[t] = sum_j w[t,j] * y_sorted[inv[t*k+j]] in one kernel with fp32 accumulation, in
            place of a weight multiply, a bf16 atomic index_add and a zero-filled buffer; backward
            writes grad_y_sorted and grad_w in one pass.
The permute-backward, combine and SwiGLU kernels are Triton kernels when Triton is importable and the
tensors are on CUDA; otherwise the same math runs as torch gathers and reductions.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

_BLOCK_H = 1024  # hidden columns per program; H=4096..7168 -> 4..7 blocks per row


def triton_ok(t: torch.Tensor) -> bool:
    """The Triton kernels run on this tensor (CUDA, or the Triton interpreter for tests)."""
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _gather_sum_kernel(src, idx, w, out, H, K: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        # out[t, cols] = sum_j w[t*K+j] * src[idx[t*K+j], cols]; grid (T, cdiv(H, BLOCK)).
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            r = tl.load(idx + t * K + j).to(tl.int64)
            v = tl.load(src + r * H + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w + t * K + j).to(tl.float32)
            acc += v
        tl.store(out + t.to(tl.int64) * H + cols, acc.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_bwd_kernel(gy, ys, idx, w, grad_ys, grad_w, H: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
        # For assignment a = t*K+j with row r = idx[a]: grad_ys[r] = w[a] * gy[t] and
        # grad_w[a] = <gy[t], ys[r]> (fp32). One program per assignment, looping over H.
        a = tl.program_id(0)
        t = (a // K).to(tl.int64)
        r = tl.load(idx + a).to(tl.int64)
        wa = tl.load(w + a).to(tl.float32)
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < H
            g = tl.load(gy + t * H + cols, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(ys + r * H + cols, mask=mask, other=0.0).to(tl.float32)
            dot += g * v
            tl.store(grad_ys + r * H + cols, (g * wa).to(grad_ys.dtype.element_ty), mask=mask)
        tl.store(grad_w + a, tl.sum(dot, axis=0))


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(h, out, F_: tl.constexpr, BLOCK: tl.constexpr):
        # out[r, c] = silu(h[r, c]) * h[r, F + c] for h[N, 2F] (gate | up), fp32 math; program (row, col block).
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F_
        a = tl.load(h + r * (2 * F_) + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(h + r * (2 * F_) + F_ + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + r * F_ + cols, (a * tl.sigmoid(a) * b).to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(g, h, dh, F_: tl.constexpr, BLOCK: tl.constexpr):
        # d/d up = g * silu(gate); d/d gate = g * up * sig(gate) * (1 + gate * (1 - sig(gate))).
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F_
        a = tl.load(h + r * (2 * F_) + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(h + r * (2 * F_) + F_ + cols, mask=mask, other=0.0).to(tl.float32)
        gg = tl.load(g + r * F_ + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        tl.store(dh + r * (2 * F_) + F_ + cols, (gg * a * sig).to(dh.dtype.element_ty), mask=mask)
        tl.store(dh + r * (2 * F_) + cols, (gg * b * sig * (1.0 + a * (1.0 - sig))).to(dh.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK = 1024  # columns per program of the SwiGLU kernels


class _SwiGLU(torch.autograd.Function):
    """silu(h[:, :F]) * h[:, F:] in one pass from the packed gate|up output; saves h only (autograd's
    version also keeps silu of the gate), and its backward writes the packed gradient [N, 2F] directly."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        h = h.contiguous()
        ctx.save_for_backward(h)
        n, f = h.shape[0], h.shape[1] // 2
        out = h.new_empty(n, f)
        if n and f:
            _swiglu_fwd_kernel[(n, triton.cdiv(f, _SWIGLU_BLOCK))](h, out, f, BLOCK=_SWIGLU_BLOCK)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (h,) = ctx.saved_tensors
        g = g.contiguous()
        dh = torch.empty_like(h)
        n, f = h.shape[0], h.shape[1] // 2
        if n and f:
            _swiglu_bwd_kernel[(n, triton.cdiv(f, _SWIGLU_BLOCK))](g, h, dh, f, BLOCK=_SWIGLU_BLOCK)
        return dh


def swiglu_torch(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a packed h[..., 2F] (gate columns first) with torch ops (any shape, dtype, device)."""
    f = h.shape[-1] // 2
    return F.silu(h[..., :f]) * h[..., f:]


def packed_swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a packed h[N, 2F] (gate columns first): one Triton kernel each way where
    Triton runs, else ``swiglu_torch``."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu needs a packed gate|up tensor of even width, got {h.shape[-1]} columns")
    if triton_ok(h) and h.dim() == 2:
        return _SwiGLU.apply(h)
    return swiglu_torch(h)


def gather_sum(src: torch.Tensor, idx: torch.Tensor, top_k: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """out[T,H] with out[t] = sum_j weight[t,j] * src[idx[t*k+j]] (weight None = 1); fp32 accumulation.

    src[N,H], idx[N] int64 with N = T*k, weight[T,k] any float dtype.
    """
    n, h = src.shape
    t = n // top_k
    if triton_ok(src):
        src = src.contiguous()
        out = torch.empty(t, h, device=src.device, dtype=src.dtype)
        w = weight.reshape(-1).contiguous() if weight is not None else idx  # dummy pointer when unused
        grid = (t, triton.cdiv(h, _BLOCK_H))
        _gather_sum_kernel[grid](src, idx.contiguous(), w, out, h, K=top_k, HAS_W=weight is not None,
                                 BLOCK=_BLOCK_H)
        return out
    rows = src.index_select(0, idx).view(t, top_k, h).float()
    if weight is not None:
        rows = rows * weight.reshape(t, top_k, 1).float()
    return rows.sum(1).to(src.dtype)


class _Permute(torch.autograd.Function):
    """x[T,H] -> x_sorted[N,H] = x[order // k]; backward: grad_x[t] = sum_j grad[inv[t*k+j]]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(inv)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inv,) = ctx.saved_tensors
        return gather_sum(grad.contiguous(), inv, ctx.top_k), None, None, None


class _Combine(torch.autograd.Function):
    """y_sorted[N,H], weight[T,k] -> y[T,H] = sum_j weight[t,j] * y_sorted[inv[t*k+j]]."""

    @staticmethod
    def forward(ctx, y_sorted: torch.Tensor, weight: torch.Tensor, inv: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(y_sorted, weight, inv)
        ctx.top_k = top_k
        return gather_sum(y_sorted, inv, top_k, weight)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        y_sorted, weight, inv = ctx.saved_tensors
        k = ctx.top_k
        gy = gy.contiguous()
        n, h = y_sorted.shape
        if triton_ok(y_sorted):
            grad_ys = torch.empty_like(y_sorted)
            grad_w = torch.empty(n, device=y_sorted.device, dtype=torch.float32)
            _combine_bwd_kernel[(n,)](gy, y_sorted, inv, weight.reshape(-1).contiguous(), grad_ys, grad_w, H=h,
                                      K=k, BLOCK=_BLOCK_H)
        else:
            order = torch.empty_like(inv)
            order[inv] = torch.arange(n, device=inv.device)
            g_rows = gy.index_select(0, order // k).float()  # [N,H] gy of each sorted row's token
            grad_ys = (g_rows * weight.reshape(-1)[order].float()[:, None]).to(y_sorted.dtype)
            grad_w_sorted = (g_rows * y_sorted.float()).sum(-1)  # [N] in sorted order
            grad_w = grad_w_sorted.index_select(0, inv)  # back to assignment order
        return grad_ys, grad_w.view(weight.shape).to(weight.dtype), None, None


def expert_counts(flat_e: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, int64 [E], without a host sync (torch.bincount on CUDA reads the
    maximum back to size its output, which stalls the launch queue once per layer)."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_e.device)
    return counts.scatter_add_(0, flat_e, torch.ones_like(flat_e))


if triton is not None:

    @triton.jit
    def _chunk_hist_kernel(e_ptr, hist_ptr, n, E_P2: tl.constexpr, BLOCK: tl.constexpr):
        # hist[c, :] = per-expert counts of assignments [c*BLOCK, (c+1)*BLOCK)
        c = tl.program_id(0)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        e = tl.load(e_ptr + offs, mask=offs < n, other=E_P2).to(tl.int32)
        bins = tl.arange(0, E_P2)
        counts = tl.sum((e[:, None] == bins[None, :]).to(tl.int32), axis=0)
        tl.store(hist_ptr + c * E_P2 + bins, counts)

    @triton.jit
    def _chunk_place_kernel(e_ptr, hist_ptr, order_ptr, inv_ptr, counts_ptr, n, chunks, E: tl.constexpr,
                            E_P2: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr):
        # row of assignment a = (rows of smaller experts) + (rows of e_a in earlier chunks)
        #                       + (earlier assignments of this chunk with the same expert)
        c = tl.program_id(0)
        bins = tl.arange(0, E_P2)
        total = tl.zeros([E_P2], dtype=tl.int32)
        before = tl.zeros([E_P2], dtype=tl.int32)
        for c0 in range(0, chunks, TILE):
            rows = c0 + tl.arange(0, TILE)
            h = tl.load(hist_ptr + rows[:, None] * E_P2 + bins[None, :], mask=(rows < chunks)[:, None], other=0)
            total += tl.sum(h, axis=0)
            before += tl.sum(tl.where((rows < c)[:, None], h, 0), axis=0)
        start = tl.cumsum(total, axis=0) - total + before  # [E_P2] first row of each expert in this chunk
        if c == 0:
            tl.store(counts_ptr + bins, total.to(tl.int64), mask=bins < E)
        idx = tl.arange(0, BLOCK)
        offs = c * BLOCK + idx
        mask = offs < n
        e = tl.load(e_ptr + offs, mask=mask, other=E_P2).to(tl.int32)
        e_other = tl.load(e_ptr + offs, mask=mask, other=E_P2 + 1).to(tl.int32)  # a different pad: no match
        same_before = (e[:, None] == e_other[None, :]) & (idx[None, :] < idx[:, None])
        rank = tl.sum(same_before.to(tl.int32), axis=1)
        # start[e] for each assignment: select from the [E_P2] vector by a one-hot product
        row = tl.sum(tl.where(e[:, None] == bins[None, :], start[None, :], 0), axis=1) + rank
        tl.store(order_ptr + row, offs.to(tl.int64), mask=mask)
        tl.store(inv_ptr + offs, row.to(tl.int64), mask=mask)


_SORT_BLOCK = 128  # assignments per program of the counting sort
_SORT_TILE = 64  # chunk histograms read at a time


def sort_by_expert(flat_e: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, inv, counts) of expert ids flat_e[N]: order[N] the assignment ids grouped by expert
    (ascending), each expert's in position order (= ``torch.argsort(flat_e, stable=True)``), inv its
    inverse, counts[E] (int64). A counting sort of two Triton kernels where Triton runs (per-chunk
    histograms; then each chunk sums the histograms before it and places its assignments), in place of
    a radix sort, its inverse and a scatter-add (1.5 ms per step on mixtral_h200, docs/performance.md
    section 8). No host synchronization."""
    n = flat_e.numel()
    if not triton_ok(flat_e) or n == 0 or num_experts > 256:
        order = torch.argsort(flat_e, stable=True)
        return order, inverse_order(order), expert_counts(flat_e, num_experts)
    e_p2 = triton.next_power_of_2(num_experts)
    chunks = triton.cdiv(n, _SORT_BLOCK)
    flat_e = flat_e.contiguous()
    dev = flat_e.device
    hist = torch.empty(chunks, e_p2, dtype=torch.int32, device=dev)
    _chunk_hist_kernel[(chunks,)](flat_e, hist, n, E_P2=e_p2, BLOCK=_SORT_BLOCK)
    order, inv = torch.empty(n, dtype=torch.int64, device=dev), torch.empty(n, dtype=torch.int64, device=dev)
    counts = torch.empty(num_experts, dtype=torch.int64, device=dev)
    _chunk_place_kernel[(chunks,)](flat_e, hist, order, inv, counts, n, chunks, E=num_experts, E_P2=e_p2,
                                   BLOCK=_SORT_BLOCK, TILE=_SORT_TILE)
    return order, inv, counts


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """inv[N] with inv[order[r]] = r (order must be a permutation of 0..N-1)."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inv


def permute(x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of x[T,H] in expert order: x_sorted[N,H] = x[order // k] (dropless, N = T*k)."""
    return _Permute.apply(x, order, inv, top_k)


def combine(y_sorted: torch.Tensor, weight: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs: y[T,H] from y_sorted[N,H] and weight[T,k]."""
    return _Combine.apply(y_sorted, weight, inv, weight.shape[1])


def grouped_mlp(x: torch.Tensor, counts: torch.Tensor, w_in: torch.Tensor, w2: torch.Tensor, *, swiglu: bool) -> torch.Tensor:
    """Expert MLPs on expert-sorted rows with torch._grouped_mm and no padding.

    x[N,H] (rows of expert e contiguous, experts ascending), counts[E] int, w2[E,H,F]; ``w_in`` is
    w13[E,2F,H] (gate rows, then up rows) with ``swiglu`` (w2(silu(gate x) * up x)), else w1[E,F,H]
    (w2(gelu(w1 x))). The gate and up projections are one grouped GEMM each way. Returns y[N,H].
    """
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] end row of each group
    h = grouped_linear(x, w_in, offs)  # [N,2F] or [N,F]
    act = packed_swiglu(h) if swiglu else F.gelu(h)
    return grouped_linear(act, w2, offs)  # [N,H]


class _GroupedLinear(torch.autograd.Function):
    """y = x @ w[e]^T on the rows of group e, with the weight gradient computed in w's own layout.

    Through autograd, ``torch._grouped_mm(x, w.transpose(-2, -1))`` yields the weight gradient as the
    transpose of a contiguous [E,I,O] tensor; the parameter is [E,O,I] contiguous, so autograd's
    gradient accumulation copied every expert weight gradient once more (36 copies of 92 M elements
    per step on mixtral_h200, docs/performance.md section 7). Here the gradient is the grouped
    product gy^T x, which comes out [E,O,I] contiguous.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        x, w, offs = ctx.saved_tensors
        gy = gy.contiguous()
        gx = torch._grouped_mm(gy, w, offs=offs) if ctx.needs_input_grad[0] else None  # [N,O] x [E,O,I]
        gw = torch._grouped_mm(gy.transpose(-2, -1), x, offs=offs) if ctx.needs_input_grad[1] else None  # [E,O,I]
        return gx, gw, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x[N,I] rows grouped by ``offs`` (int32 end rows), w[E,O,I] -> [N,O]: row r of group e is x[r] @ w[e]^T."""
    return _GroupedLinear.apply(x, w, offs)


class _RouterLinear(torch.autograd.Function):
    """Router logits[T,E] (fp32) = x[T,H] @ w[E,H]^T for bf16 x and w on CUDA, on tensor cores.

    The products of bf16 values are exact in fp32 and cuBLAS accumulates in fp32, so the logits are
    those of the fp32 matmul of the same values up to summation order, without an fp32 copy of the
    activations. The fp32 route (cast x and w, SIMT fp32 GEMMs for an E-column output) cost ~5 ms
    per step on mixtral_h200 (docs/performance.md, section 7). Backward runs in bf16 with fp32
    accumulation: the fp32 logit gradient is rounded to bf16 once, as any bf16 linear layer does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        gb = g.to(torch.bfloat16)
        gx = torch.mm(gb, w) if ctx.needs_input_grad[0] else None  # [T,E] x [E,H]
        gw = torch.mm(gb.t(), x) if ctx.needs_input_grad[1] else None  # [E,T] x [T,H]
        return gx, gw


_MM_OUT_DTYPE: bool | None = None


def router_linear_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``router_linear`` runs: CUDA, bf16 x[T,H] and w, a torch with ``mm(..., out_dtype=)``."""
    global _MM_OUT_DTYPE
    if not (x.is_cuda and x.dim() == 2 and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16):
        return False
    if _MM_OUT_DTYPE is None:
        try:
            torch.mm(x[:1], w[:1].t(), out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return _MM_OUT_DTYPE


def router_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 logits x @ w^T from bf16 x[T,H] and w[E,H] (see ``_RouterLinear``); check ``router_linear_ok``."""
    return _RouterLinear.apply(x, w)


def grouped_mm_ok(x: torch.Tensor, hidden: int, inner: int) -> bool:
    """torch._grouped_mm runs these shapes: CUDA sm90+, bf16, H and F multiples of 8 (16-byte rows)."""
    return (
        x.is_cuda
        and hasattr(torch, "_grouped_mm")
        and x.dtype == torch.bfloat16
        and hidden % 8 == 0
        and inner % 8 == 0
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
    )
