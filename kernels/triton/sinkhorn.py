"""Fused log-domain Sinkhorn kernels (Triton): forward and envelope backward, no [B, N, M] in the backward.

Math (per pair; see ``otfast.reference`` for the specification these kernels implement). With
C_ij = |x_i - y_j|^2 / 2, log-weights alpha, beta (-inf on padding), d = 1 / (1 + eps / rho):

    row soft-min     T(g)_i  = -d eps LSE_j( beta_j  + (g_j - C_ij) / eps )
    column soft-min  T~(f)_j = -d eps LSE_i( alpha_i + (f_i - C_ij) / eps )
    loop             f, g <- (f + T(g)) / 2, (g + T~(f)) / 2   (annealing, then n_extra at the final eps,
                     a pair stops on its own once its residual <= tol), then f, g <- T(g), T~(f)

Everything runs in base 2: with k = log2(e) / eps, LSE_j(z_j) = ln 2 * LSE2_j(log2(e) z_j), so each entry
of a pass costs a subtraction and an FMA (beta2_j + k (g_j - C_ij)), a max, an exp2 and an add.

Kernels and their memory traffic (fp32 throughout; inputs of any float dtype are upcast on load):

- ``_sinkhorn_resident_kernel``: one program per pair, the whole cost tile (up to 64 x 64) in registers,
  computed on chip from x and y (``tl.dot``, 2 D flops per entry, once) or loaded from a precomputed cost.
  Reads x, y (or C) once, writes f, g, f_prev, g_prev, the iteration count and the residual:
  O(N D + M D) bytes in, O(N + M) out. Per iteration 2 N M exponentials (N M when symmetric).
- ``_cost_kernel`` + ``_sinkhorn_streaming_kernel``: any length. The cost is written once in fp32
  (4 N M bytes per pair: recomputing it from x, y every pass would cost 2 D flops per entry per pass,
  far above the exp and bandwidth floors), then each pass streams it tile by tile with an online
  log-sum-exp; potentials live in small [B, N] / [B, M] buffers (L2 resident).
- ``_grad_kernel``: out_i = u_i (x_i - sum_j S_ij y_j), S_ij = exp2(beta2_j + k (g_j - C_ij + f_i / d)):
  grid (pair, row block, output feature block); C tiles are recomputed from x, y and S is multiplied
  into y with ``tl.dot``, flash-attention style. Called once for dx and once (roles swapped) for dy.
  Reads x, y, potentials; writes dx: no [B, N, M] buffer.

Precision: cost tiles and S @ y use ``input_precision`` chosen by the launcher ("ieee" by default; tf32
has ~1e-3 relative error, far too coarse when C / eps reaches 1e4). Masked entries are -inf in every
LSE; the running max is guarded so an all -inf row gives 0, never NaN.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _expm1(x):
    # exp(x) - 1 without the cancellation near 0 (Taylor to x^3, relative error < 1e-9 for |x| < 1e-2)
    # (the exponent is capped at 80: a residual of e^80 reads as "far from converged" all the same)
    return tl.where(tl.abs(x) < 1e-2, x * (1.0 + x * (0.5 + x * (1.0 / 6.0))), tl.exp(tl.minimum(x, 80.0)) - 1.0)


@triton.jit
def _residual(f_old, f_new, logw2, eps):
    """sum_i w_i |exp((f_old_i - f_new_i) / eps) - 1| with w = exp2(logw2) (0 where logw2 = -inf)."""
    w = tl.where(logw2 > float("-inf"), tl.exp2(logw2), 0.0)
    return tl.sum(w * tl.abs(_expm1((f_old - f_new) / eps)), axis=0)


@triton.jit
def _cost_tile(Xp, Yp, offs_n, offs_m, in_n, in_m, D, sxn, sxd, sym, syd,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """C_ij = |x_i|^2/2 + |y_j|^2/2 - <x_i, y_j> for one [BLOCK_N, BLOCK_M] tile, accumulated in fp32."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    xx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    yy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < D
        xt = tl.load(Xp + offs_n[:, None] * sxn + offs_k[None, :] * sxd, mask=in_n[:, None] & in_k[None, :],
                     other=0.0).to(tl.float32)
        yt = tl.load(Yp + offs_k[:, None] * syd + offs_m[None, :] * sym, mask=in_k[:, None] & in_m[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(xt, yt, acc, input_precision=PRECISION)
        xx += tl.sum(xt * xt, axis=1)
        yy += tl.sum(yt * yt, axis=0)
    return tl.maximum(0.5 * xx[:, None] + 0.5 * yy[None, :] - acc, 0.0)


@triton.jit
def _cost_tile_outer(Xp, Yp, offs_n, offs_m, in_n, in_m, D, sxn, sxd, sym, syd,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """The cost tile as D rank-1 fp32 FMA updates: exact fp32 products, and the accumulator keeps the
    plain blocked layout that both reductions of the loop use (a tl.dot result would need layout
    conversions that cost registers the resident tile cannot spare)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    xx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    yy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for kk in range(0, D):
        xk = tl.load(Xp + offs_n * sxn + kk * sxd, mask=in_n, other=0.0).to(tl.float32)
        yk = tl.load(Yp + offs_m * sym + kk * syd, mask=in_m, other=0.0).to(tl.float32)
        acc += xk[:, None] * yk[None, :]
        xx += xk * xk
        yy += yk * yk
    return tl.maximum(0.5 * xx[:, None] + 0.5 * yy[None, :] - acc, 0.0)


@triton.jit
def _softmin(C, w2, p, k, scale, valid, AXIS: tl.constexpr):
    """-scale * LSE2 over AXIS of (w2 + k (p - C)), the vectors w2, p broadcast along the other axis;
    0 where ``valid`` is False.

    p - C is formed before the scaling by k = log2(e) / eps: both are O(C) while k (p - C) reaches 1e4,
    so scaling first would cancel catastrophically. Two sweeps over the resident tile (max, then sum
    of exp2) recompute the exponent from C, so no second tile-sized temporary stays live."""
    if AXIS == 1:
        m = tl.max(tl.fma(p[None, :] - C, k, w2[None, :]), axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(tl.exp2(tl.fma(p[None, :] - C, k, w2[None, :] - m[:, None])), axis=1)
    else:
        m = tl.max(tl.fma(p[:, None] - C, k, w2[:, None]), axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(tl.exp2(tl.fma(p[:, None] - C, k, w2[:, None] - m[None, :])), axis=0)
    return tl.where(valid, -scale * (m + tl.log2(s)), 0.0)


@triton.jit
def _update(C, f, g, alpha2, beta2, valid_n, valid_m, eps, inv_rho, SYMMETRIC: tl.constexpr):
    """(T(g), T~(f)) at temperature eps on a resident tile; T~(f) = T(g) when SYMMETRIC."""
    k = LOG2E / eps
    scale = eps * LN2 / (1.0 + eps * inv_rho)
    ft = _softmin(C, beta2, g, k, scale, valid_n, 1)
    if SYMMETRIC:
        gt = ft
    else:
        gt = _softmin(C, alpha2, f, k, scale, valid_m, 0)
    return ft, gt


@triton.jit
def _sinkhorn_resident_kernel(
        X, Y, COST, ALPHA, BETA, ANNEAL, F, G, F_PREV, G_PREV, ITERS, ERR,
        N, M, D, sxb, sxn, sxd, syb, sym, syd, scb, scn, scm,
        n_anneal, eps_init, eps, n_extra, tol, inv_rho,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, FROM_POINTS: tl.constexpr, SYMMETRIC: tl.constexpr,
        HAS_TOL: tl.constexpr):
    """One pair per program, the whole cost tile in registers, every iteration on chip."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    in_n = offs_n < N
    in_m = offs_m < M
    alpha2 = tl.load(ALPHA + pid * N + offs_n, mask=in_n, other=float("-inf")).to(tl.float32) * LOG2E
    beta2 = tl.load(BETA + pid * M + offs_m, mask=in_m, other=float("-inf")).to(tl.float32) * LOG2E
    valid_n = alpha2 > float("-inf")
    valid_m = beta2 > float("-inf")
    if FROM_POINTS:
        C = _cost_tile_outer(X + pid * sxb, Y + pid * syb, offs_n, offs_m, in_n, in_m, D, sxn, sxd, sym, syd,
                             BLOCK_N, BLOCK_M)
    else:
        C = tl.load(COST + pid * scb + offs_n[:, None] * scn + offs_m[None, :] * scm,
                    mask=in_n[:, None] & in_m[None, :], other=0.0).to(tl.float32)

    f = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    f, g = _update(C, f, g, alpha2, beta2, valid_n, valid_m, eps_init, inv_rho, SYMMETRIC)
    for t in range(n_anneal):
        ft, gt = _update(C, f, g, alpha2, beta2, valid_n, valid_m, tl.load(ANNEAL + t), inv_rho, SYMMETRIC)
        f = (f + ft) * 0.5
        g = (g + gt) * 0.5

    it = n_extra * 0
    go = n_extra > 0
    while go:
        ft, gt = _update(C, f, g, alpha2, beta2, valid_n, valid_m, eps, inv_rho, SYMMETRIC)
        active = go
        if HAS_TOL:
            err = _residual(f, ft, alpha2, eps) + _residual(g, gt, beta2, eps)
            active = err > tol
        f = tl.where(active, (f + ft) * 0.5, f)
        g = tl.where(active, (g + gt) * 0.5, g)
        it += active.to(tl.int32)
        go = active & (it < n_extra)

    f_new, g_new = _update(C, f, g, alpha2, beta2, valid_n, valid_m, eps, inv_rho, SYMMETRIC)
    err = _residual(f, f_new, alpha2, eps) + _residual(g, g_new, beta2, eps)
    tl.store(F + pid * N + offs_n, f_new, mask=in_n)
    tl.store(F_PREV + pid * N + offs_n, f, mask=in_n)
    tl.store(G + pid * M + offs_m, g_new, mask=in_m)
    tl.store(G_PREV + pid * M + offs_m, g, mask=in_m)
    tl.store(ITERS + pid, n_anneal + it)
    tl.store(ERR + pid, err)


@triton.jit
def _cost_kernel(X, Y, COST, N, M, D, sxb, sxn, sxd, syb, sym, syd,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """COST[b] = |x_i - y_j|^2 / 2 tile by tile, fp32, contiguous [B, N, M]. Grid (B, N tiles, M tiles)."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_n = offs_n < N
    in_m = offs_m < M
    C = _cost_tile(X + pid * sxb, Y + pid * syb, offs_n, offs_m, in_n, in_m, D, sxn, sxd, sym, syd,
                   BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)
    tl.store(COST + pid * N * M + offs_n[:, None] * M + offs_m[None, :], C, mask=in_n[:, None] & in_m[None, :])


@triton.jit
def _stream_softmin(Cp, s_row, s_col, n_rows, n_cols, LOGW_COL, POT_COL, LOGW_ROW, OUT, k, scale,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT_i = -scale LSE2_j(logw2_j + k (pot_j - C_ij)) for every row i, online over column tiles
    (pot_j - C_ij is formed before the scaling, as in ``_softmin``).

    The column pass of the loop is this same routine on the transposed cost (strides swapped)."""
    for r0 in range(0, n_rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < n_rows
        m_run = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        s_run = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, n_cols, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            in_c = offs_c < n_cols
            w2 = tl.load(LOGW_COL + offs_c, mask=in_c, other=float("-inf")) * LOG2E
            p = tl.load(POT_COL + offs_c, mask=in_c, other=0.0)
            C = tl.load(Cp + offs_r[:, None] * s_row + offs_c[None, :] * s_col,
                        mask=in_r[:, None] & in_c[None, :], other=0.0)
            z = tl.fma(p[None, :] - C, k, w2[None, :])
            m_new = tl.maximum(m_run, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_run = s_run * tl.exp2(m_run - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), axis=1)
            m_run = m_new
        m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
        valid = tl.load(LOGW_ROW + offs_r, mask=in_r, other=float("-inf")) > float("-inf")
        tl.store(OUT + offs_r, tl.where(valid, -scale * (m_safe + tl.log2(s_run)), 0.0), mask=in_r)


@triton.jit
def _stream_update(Cp, scn, scm, N, M, ALPHA, BETA, F, G, FT, GT, eps, inv_rho,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SYMMETRIC: tl.constexpr):
    """FT = T(G), GT = T~(F) (GT unused when SYMMETRIC) at temperature eps, streaming the cost."""
    k = LOG2E / eps
    scale = eps * LN2 / (1.0 + eps * inv_rho)
    _stream_softmin(Cp, scn, scm, N, M, BETA, G, ALPHA, FT, k, scale, BLOCK_N, BLOCK_M)
    if not SYMMETRIC:
        _stream_softmin(Cp, scm, scn, M, N, ALPHA, F, BETA, GT, k, scale, BLOCK_M, BLOCK_N)
    tl.debug_barrier()


@triton.jit
def _stream_residual(P, PT, LOGW, n, eps, BLOCK: tl.constexpr):
    err = 0.0
    for o in range(0, n, BLOCK):
        offs = o + tl.arange(0, BLOCK)
        inb = offs < n
        logw2 = tl.load(LOGW + offs, mask=inb, other=float("-inf")) * LOG2E
        err += _residual(tl.load(P + offs, mask=inb, other=0.0), tl.load(PT + offs, mask=inb, other=0.0),
                         logw2, eps)
    return err


@triton.jit
def _stream_combine(P, PT, n, w_old, BLOCK: tl.constexpr):
    """P <- w_old P + (1 - w_old) PT: 0 copies (the init), 0.5 averages (the symmetric update)."""
    for o in range(0, n, BLOCK):
        offs = o + tl.arange(0, BLOCK)
        inb = offs < n
        p = tl.load(P + offs, mask=inb, other=0.0)
        pt = tl.load(PT + offs, mask=inb, other=0.0)
        tl.store(P + offs, w_old * p + (1.0 - w_old) * pt, mask=inb)
    tl.debug_barrier()


@triton.jit
def _stream_error(F, FT, G, GT, ALPHA, BETA, N, M, eps,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Residual of the rows plus the columns (twice the rows when SYMMETRIC)."""
    if SYMMETRIC:
        err = 2.0 * _stream_residual(F, FT, ALPHA, N, eps, BLOCK_N)
    else:
        err = _stream_residual(F, FT, ALPHA, N, eps, BLOCK_N) + _stream_residual(G, GT, BETA, M, eps, BLOCK_M)
    return err


@triton.jit
def _stream_step(F, FT, G, GT, N, M, w_old, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 SYMMETRIC: tl.constexpr):
    _stream_combine(F, FT, N, w_old, BLOCK_N)
    if not SYMMETRIC:
        _stream_combine(G, GT, M, w_old, BLOCK_M)


@triton.jit
def _sinkhorn_streaming_kernel(
        COST, ALPHA, BETA, ANNEAL, F, G, FT, GT, ITERS, ERR,
        N, M, scb, scn, scm, n_anneal, eps_init, eps, n_extra, tol, inv_rho,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_TOL: tl.constexpr):
    """One pair per program, any length: the cost streams tile by tile, potentials live in global memory.

    F, G hold the current potentials (zero on entry; G aliases F when SYMMETRIC) and end as f_prev,
    g_prev; FT, GT are scratch and end as the final f, g."""
    pid = tl.program_id(0).to(tl.int64)
    Cp = COST + pid * scb
    A, Bw = ALPHA + pid * N, BETA + pid * M
    Fp, Gp, FTp, GTp = F + pid * N, G + pid * M, FT + pid * N, GT + pid * M

    _stream_update(Cp, scn, scm, N, M, A, Bw, Fp, Gp, FTp, GTp, eps_init, inv_rho, BLOCK_N, BLOCK_M, SYMMETRIC)
    _stream_step(Fp, FTp, Gp, GTp, N, M, 0.0, BLOCK_N, BLOCK_M, SYMMETRIC)
    for t in range(n_anneal):
        _stream_update(Cp, scn, scm, N, M, A, Bw, Fp, Gp, FTp, GTp, tl.load(ANNEAL + t), inv_rho,
                       BLOCK_N, BLOCK_M, SYMMETRIC)
        _stream_step(Fp, FTp, Gp, GTp, N, M, 0.5, BLOCK_N, BLOCK_M, SYMMETRIC)

    it = n_extra * 0
    go = n_extra > 0
    while go:
        _stream_update(Cp, scn, scm, N, M, A, Bw, Fp, Gp, FTp, GTp, eps, inv_rho, BLOCK_N, BLOCK_M, SYMMETRIC)
        active = go
        if HAS_TOL:
            active = _stream_error(Fp, FTp, Gp, GTp, A, Bw, N, M, eps, BLOCK_N, BLOCK_M, SYMMETRIC) > tol
        if active:
            _stream_step(Fp, FTp, Gp, GTp, N, M, 0.5, BLOCK_N, BLOCK_M, SYMMETRIC)
        it += active.to(tl.int32)
        go = active & (it < n_extra)

    _stream_update(Cp, scn, scm, N, M, A, Bw, Fp, Gp, FTp, GTp, eps, inv_rho, BLOCK_N, BLOCK_M, SYMMETRIC)
    tl.store(ITERS + pid, n_anneal + it)
    tl.store(ERR + pid, _stream_error(Fp, FTp, Gp, GTp, A, Bw, N, M, eps, BLOCK_N, BLOCK_M, SYMMETRIC))


@triton.jit
def _grad_kernel(X, Y, F, G_PREV, ALPHA, BETA, U, OUT,
                 N, M, D, sxb, sxn, sxd, syb, sym, syd, k, inv_d,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
                 PRECISION: tl.constexpr):
    """OUT_i = u_i (x_i - sum_j S_ij y_j) for one row block and one block of output features.

    S_ij = exp2(beta2_j + k (g_prev_j - C_ij + f_i / d)) with k = log2(e)/eps, the small sum in parentheses
    formed before the scaling: the rows of S sum to 1 because f = T(g_prev). Grid (B, N blocks, D blocks);
    OUT is contiguous fp32 [B, N, D]."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_do = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    in_n = offs_n < N
    in_do = offs_do < D
    Xp, Yp = X + pid * sxb, Y + pid * syb
    valid_n = tl.load(ALPHA + pid * N + offs_n, mask=in_n, other=float("-inf")) > float("-inf")
    f_d = tl.load(F + pid * N + offs_n, mask=in_n, other=0.0) * inv_d
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_m = offs_m < M
        C = _cost_tile(Xp, Yp, offs_n, offs_m, in_n, in_m, D, sxn, sxd, sym, syd,
                       BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)
        beta2 = tl.load(BETA + pid * M + offs_m, mask=in_m, other=float("-inf")) * LOG2E
        g = tl.load(G_PREV + pid * M + offs_m, mask=in_m, other=0.0)
        e = tl.fma((g[None, :] - C) + f_d[:, None], k, beta2[None, :])
        S = tl.exp2(tl.where(valid_n[:, None] & (beta2 > float("-inf"))[None, :], e, float("-inf")))
        yt = tl.load(Yp + offs_m[:, None] * sym + offs_do[None, :] * syd, mask=in_m[:, None] & in_do[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(S, yt, acc, input_precision=PRECISION)
    xt = tl.load(Xp + offs_n[:, None] * sxn + offs_do[None, :] * sxd, mask=in_n[:, None] & in_do[None, :],
                 other=0.0).to(tl.float32)
    u = tl.load(U + pid * N + offs_n, mask=in_n, other=0.0)
    tl.store(OUT + pid * N * D + offs_n[:, None] * D + offs_do[None, :], u[:, None] * (xt - acc),
             mask=in_n[:, None] & in_do[None, :])
