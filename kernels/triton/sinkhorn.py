"""Fused log-domain Sinkhorn kernels (Triton): forward and envelope backward, no [B, N, M] in the backward.

Math: the loop of ``otfast.schedule`` (the one written specification: the soft-min T, its transpose, the
dampening d, the init, annealing, iterations and final step; the names here follow it) on the cost
C_ij = |x_i - y_j|^2 / 2 of the prepared points.

Precision. The N M work runs in fp32; what fp32 cannot hold runs in float64 (the float64 torch backend is
the yardstick: ``python -m benchmarks.accuracy``):

- Potentials are float64 (registers for the resident kernel, global buffers when streaming): at the
  paper's C / eps ~ 1e5 one fp32 rounding of a potential of the cost's size moves the plan by 1%.
- The cost is formed from float64 prepared points with float64 accumulation (FMAs, or DMMA ``tl.dot``) and
  kept as two fp32 tiles, C = C_hi + C_lo: an fp32 dot product over D = 768 is off by several units in the
  last place, which at that C / eps is a percent-level change of the plan.
- Fast passes (every temperature up to ``PRECISE_RATIO`` times the final one): with p the reference of the
  potential being updated (see below) and q the one summed over, u_ij = C_ij - p_i - q_j is formed without
  rounding large numbers: (s, e) = TwoSum(C_hi_ij, -ph_i), u_ij = (s - qh_j) + (e + C_lo_ij), where ph, qh
  are the fp32 roundings of p, q; near the plan's support s - qh_j is exact (Sterbenz), so the exponent -u k
  (k = log2(e) / eps) carries only its own rounding. The low parts ql = q - qh go into the column weights,
  those of p cancel: T(q)_i = d (ph_i - eps ln2 LSE2_j(beta2_j + ql_j k - u_ij k)). About 12 fp32 operations
  and one exp2 per entry. The reference p is the row's previous update (undamped at its own temperature,
  ``_reference``), so the exponents' max is near 0 close to convergence and within tens of binary orders in
  the annealing steps: the pass sums them in one sweep; only where some row's max is ``NEAR`` or further
  from p (far from convergence, where exponents in the thousands would each carry a rounding of 1e-4) does
  it sweep again relative to the max (``_near``). The streaming kernel keeps u itself as an fp32 tile, the
  absorbed cost K_ij = C_ij - a_i - b_j on anchors a, b (the fp32 roundings of p and q where it was formed),
  and while p and q stay within ``STREAM_DRIFT`` binary orders of the anchors its exponent is
  (beta2_j + (q_j - b_j) k) + (p_i - a_i) k - K_ij k: two fp32 operations per entry, each term at most
  tens of binary orders where the exponent counts, so a rounding of the same order as u's.
- Precise passes (larger temperatures: the first steps of the annealing): exponents, maxima, exponentials
  and sums in float64. An fp32 log-sum-exp at temperature eps leaves an absolute error of about eps 2^-24 in
  the potentials, which the following steps carry down to the final eps (measured with the torch backend's
  loop: 5e-4 relative gradient error at D = 768, scale 1 in the paper setting; 1e-7 with float64
  log-sum-exps above 256 times the final eps). fp32 exponentials of float64 exponents are not enough: the
  rounding of an exponent z to fp32 is |z| 2^-24 of its term, and left 1.2e-4 in that cell (the same on an
  H200 and in the interpreter); 2.7e-6 with float64 exponentials (interpreter; 1.2e-7 with every pass
  precise: the rest is the fast passes').
- The backward normalises each plan row by its own log-sum-exp (online, as flash-attention's forward),
  never assuming that rows built from the stored potentials sum to 1.

Everything is base 2 (exp2/log2) in the fp32 parts; masked entries are -inf in every LSE, and the running
max is guarded so an all -inf row gives 0, never NaN.

Kernels and their memory traffic:

- ``_sinkhorn_resident_kernel``: one program per pair and problem, both cost tiles (``configs.RESIDENT_TILES``:
  32 square at 4 warps, 64 at 8 with triton >= 3.7) in registers, formed on chip from x and y (2 D float64 FMAs
  per entry, once) or loaded from a precomputed float64 cost (32 only). Reads x, y (or C) once, writes f, g,
  f_prev, g_prev, the iteration count and the residual: O(N D + M D) bytes in, O(N + M) out. Per iteration
  2 N M exponentials (N M when symmetric).
- ``_centre_kernel``: each pair's mean of valid points (float64 [3, B, D]: one per problem), which the
  kernels that read points subtract as they load them (``_centred``; padding rows are never read), so
  that the norm expansion of the cost does not cancel. Reads x, y once.
- ``_bounds_kernel``: each pair's bounding box of its valid points (by the masks, x and y together), which
  ``triton_backend.bounding_diameter`` reduces over the batch to the annealing start. Reads x, y once.
- ``_cost_kernel`` + ``_sinkhorn_streaming_kernel``: any length. The cost is written once as C_hi, C_lo (8 N M
  bytes per pair), then each pass streams it tile by tile (a fast pass accumulates per lane and reduces once
  per row block, a precise one or a second sweep keeps an online log-sum-exp); the float64 potentials live in
  [B, N] / [B, M] buffers (L2 resident). Fast passes read the absorbed cost C - a_i - b_j instead (fp32, 4 N M
  bytes more, formed by the pass before whose potentials drifted from the anchors a, b: two fp32 operations
  per exponent instead of ten, and half the bytes; ``_stream_softmin``). Where those buffers do not fit (the
  launcher's choice), the streaming solvers (FROM_POINTS, the split kernel's too) form every tile of every
  pass from x, y as ``_cost_kernel`` does (the same float64 arithmetic on smaller tiles): 2 D float64 flops
  per entry and pass instead of 8 bytes read, and no [B, N, M] buffer (``_stream_tile``).
- ``_grad_kernel``: out_i = u_i (x_i - sum_j S_ij y_j), S_ij = softmax_j(beta_j + (g_prev_j - C_ij) / eps):
  one pass per (pair, row block, side, feature group; one group, all of D, unless the grid would leave
  the GPU idle): each cost tile is recomputed from x, y once (DMMA over all of D), its S multiplies every
  32-wide slice of y with ``tl.dot`` (fp32 ``input_precision`` from the launcher) into an accumulator in
  the program's own output rows, rescaled by a running max, and divided by its row sums at the end. One
  launch writes dx and (roles swapped) dy, each with the debiased loss's second term subtracted (in two
  passes: it adds to term 0's finished rows, which cannot be rescaled). Reads x, y and the potentials;
  reads and writes each program's rows of dx, dy once per column tile: no [B, N, M] buffer, no scratch.
- ``_sinkhorn_split_kernel`` (opt-in, ``OTFAST_TRITON_SPLIT``): the streaming solver with each pair and
  problem's rows and columns shared among several programs, for long pairs that leave SMs idle: grid
  (pair, problem, split); each step's residual is the sum of the programs' shares, decided alike by all;
  persistent (one launch, ``_grid_sync`` twice per step) or one launch per half step.

The solvers run the loss's problems OT(x, y), OT(x, x), OT(y, y) (``_problem``) side by side: grid
(pair, problem), whether a problem is symmetric decided at run time.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Passes at a temperature above PRECISE_RATIO times the final one run in float64 (see the module docstring).
PRECISE_RATIO = tl.constexpr(256.0)
# A fast pass sums its exponents relative to the row's previous update in one sweep when every max lies within
# NEAR binary orders of it; otherwise it sweeps again relative to a reference shifted onto the max (``_near``).
# A streamed pass sums 2^z without an offset (``_stream_sum2``): NEAR + log2(columns) must stay below 128.
NEAR = tl.constexpr(32.0)
# The backward's loops whose loads feed tl.dot (the DMMA steps that form a cost tile from the points, the slices
# of S @ y with the ieee dot) and its output rows run in STAGES software-pipelined stages (``tl.range``): the next
# trip's loads go out as async copies to shared memory (where a dot reads its operands anyway) while this trip
# computes, so each trip waits only for what is left of a load issued a trip earlier, not for a whole global
# load issued after the previous trip's work. The other loops keep configs.NUM_STAGES (1): the solvers' tile
# loops took 38-104 more SASS instructions and 2 barriers per tile pipelined (staging through shared memory), and
# forming their tiles from the points pipelined (as the cost kernel at 4 warps) spilled 16-92 B under triton 3.6
# and 3.7.
STAGES = tl.constexpr(2)
# The streaming solvers' loops over a vector of potentials (drift checks with the column weights, residuals,
# averaging) take VECTOR entries a trip: each trip waits for its global loads, and a pair of up to VECTOR tokens
# then waits once per loop instead of once per 32.
VECTOR = tl.constexpr(256)
# Exponents whose max reaches FAR (|m| 2^-23 = 8 binary orders of rounding) get a second max (``_far``).
FAR = tl.constexpr(2.0**26)
# Pointer arguments that hold float64 (the points X, Y and the backward's U_*, OUT_* are fp32 or float64,
# ``configs.POINT_DTYPES``; every other pointer holds fp32, ITERS and SYNC int32): the launchers pass these, and
# the sm_90 resource check (``python -m otfast.kernels.triton.resources``) compiles with them.
FLOAT64_POINTERS = frozenset({"MU", "COST", "ALPHA", "BETA", "SCHED", "PARTS", "F0", "F1", "F2", "FP0", "FP1", "FP2",
                              "G", "G_PREV", "ERR", "F_XY", "G_XY", "FP_XY", "GP_XY", "F_XX", "FP_XX", "F_YY", "FP_YY"})


@triton.jit
def _expm1(x):
    # exp(x) - 1 without the cancellation near 0 (Taylor to x^3, relative error < 1e-9 for |x| < 1e-2)
    # (the exponent is capped at 80: a residual of e^80 reads as "far from converged" all the same)
    return tl.where(tl.abs(x) < 1e-2, x * (1.0 + x * (0.5 + x * (1.0 / 6.0))), tl.exp(tl.minimum(x, 80.0)) - 1.0)


@triton.jit
def _residual_terms(f_old, f_new, w, eps):
    """w_i |exp((f_old_i - f_new_i) / eps) - 1| (float64 potentials, fp32 weights and terms)."""
    return w * tl.abs(_expm1(((f_old - f_new) / eps).to(tl.float32)))


@triton.jit
def _residual(f_old, f_new, w, eps):
    """The marginal residual sum_i ``_residual_terms``_i."""
    return tl.sum(_residual_terms(f_old, f_new, w, eps))


@triton.jit
def _split(p):
    """``(hi, lo)``: the fp32 rounding of a float64 tensor and the rest, p = hi + lo to about 2^-48."""
    hi = p.to(tl.float32)
    return hi, (p - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def _two_diff(a, b):
    """``(s, e)`` with s = a - b rounded and s + e = a - b exactly (Knuth's TwoSum, branch-free)."""
    s = a - b
    bb = s - a
    return s, (a - (s - bb)) - (b + bb)


@triton.jit
def _fast_exponents(C_hi, C_lo, ph, qh, w2, k):
    """z = w2_q - (C - ph - qh) k on a tile, with ph (the reference of the side a pass keeps), qh and w2 (of the
    side it sums over) broadcast over it. See the module docstring: u is exact near the support."""
    return w2 - _differences(C_hi, C_lo, ph, qh) * k


@triton.jit
def _differences(C_hi, C_lo, ph, qh):
    """u = C - ph - qh on a tile (ph, qh broadcast over it), exact near the support (``_fast_exponents``)."""
    s, e = _two_diff(C_hi, ph)
    return (s - qh) + (e + C_lo)


@triton.jit
def _max_over(z, AXIS: tl.constexpr):
    """The max of a resident tile [GROUPS, rows, columns / GROUPS] over its columns (AXIS 1: axes 0 and 2) or
    its rows (AXIS 0: axis 1), kept in the tile's rank (``_sinkhorn_resident_kernel``)."""
    if AXIS == 1:
        out = tl.max(tl.max(z, axis=0, keep_dims=True), axis=2, keep_dims=True)
    else:
        out = tl.max(z, axis=1, keep_dims=True)
    return out


@triton.jit
def _sum_over(z, AXIS: tl.constexpr):
    """The sum of a resident tile over its columns (AXIS 1) or rows (AXIS 0), as ``_max_over``."""
    if AXIS == 1:
        out = tl.sum(tl.sum(z, axis=0, keep_dims=True), axis=2, keep_dims=True)
    else:
        out = tl.sum(z, axis=1, keep_dims=True)
    return out


@triton.jit
def _softmin_fast(C_hi, C_lo, p, q, logw2_q, eps, damping, valid, AXIS: tl.constexpr):
    """T(q) over AXIS on resident tiles (float64 in and out), relative to the reference p (the previous
    update of the same potential, undamped: ``_reference``).

    The exponents are formed relative to p and their max m taken. Where every |m| is below ``NEAR``
    (``_near``: near convergence, and in most annealing steps) they are summed as they are. Otherwise (far
    from convergence, as a fixed small eps from zero potentials, where m is in the thousands and exponents
    of that size would each carry a rounding of 1e-4, noise the iterations accumulate: measured 0.04 eps in
    f + g after 300 updates at D = 16, scale 10, eps 0.0025, 5e-5 eps with this second sweep) they are
    formed again relative to p' = p - eps ln2 m, where the largest exponent c is about 0 (``_shifted``).
    Where some |m| reaches ``FAR`` (C / eps ~ 1e8 and more, far from the potentials), m's own fp32 rounding
    can move c by hundreds of binary orders, and exp2 overflowed (NaN potentials): then c is the max of the
    second sweep's exponents (``_far``; ``tests/test_triton_interpreter.py`` has the case). Each test is a
    uniform branch."""
    k = ((1.0 / eps) * LOG2E).to(tl.float32)
    ph, _ = _split(p)
    qh, ql = _split(q)
    w2 = logw2_q + ql * k
    z = _fast_exponents(C_hi, C_lo, ph, qh, w2, k)
    c = _finite(_max_over(z, AXIS))
    if not _near(c, valid):
        m = c
        ph, c = _shifted(ph, m, eps)
        z = _fast_exponents(C_hi, C_lo, ph, qh, w2, k)
        if _far(m):
            c = _finite(_max_over(z, AXIS))
    s = _sum_over(tl.exp2(z - c), AXIS)
    out = damping * (ph.to(tl.float64) - (eps * LN2) * (c.to(tl.float64) + tl.log2(s).to(tl.float64)))
    return tl.where(valid, out, 0.0)


@triton.jit
def _finite(m):
    """A running max with -inf (every entry masked) read as 0, so that exponents minus it stay -inf, not NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _shifted(ph, m, eps):
    """``(ph2, c)``: the fp32 reference ph2 = fp32(ph - eps ln2 m) for exponents whose max was m relative to
    ph, and c = (ph2 - (ph - eps ln2 m)) log2(e) / eps, the max relative to ph2 (about 0 unless the
    potentials are too large for fp32 to resolve eps, when c keeps exp2 from overflowing), exact to within
    m's own rounding (``_far``)."""
    target = ph.to(tl.float64) - (eps * LN2) * _finite(m).to(tl.float64)
    ph2 = target.to(tl.float32)
    return ph2, ((ph2.to(tl.float64) - target) * ((1.0 / eps) * LOG2E)).to(tl.float32)


@triton.jit
def _near(m, valid):
    """Whether every max m of fp32 exponents relative to a reference is within ``NEAR`` binary orders of it, so
    that the exponents that count (within 24 binary orders of the max) carry a rounding of at most (NEAR + 24 +
    log2(1 / w_min)) 2^-24, about twice that of exponents relative to a reference on the max (``_shifted``),
    and one sweep suffices. Only the valid rows count (padding and the tile's lanes past the pair have
    exponents of any size, and outputs nobody reads)."""
    return tl.max(tl.where(valid, tl.abs(m), 0.0)) < NEAR


@triton.jit
def _reference(prev, eps_prev, inv_rho):
    """The reference of a fast pass: the previous update of the same potential divided by its dampening d at
    its temperature eps_prev (``_update``, ``_stream_update``): the exponents relative to the undamped
    soft-min have their max near 0 at every fixed point, balanced or not."""
    return prev * (1.0 + eps_prev * inv_rho)


@triton.jit
def _far(m):
    """Whether some max m of fp32 exponents is so large (``FAR``) that its rounding, |m| 2^-23 at most, can
    put the max relative to the shifted reference outside what ``_shifted``'s c accounts for by more than
    exp2's range allows: the second sweep then takes its own max."""
    return tl.max(tl.abs(_finite(m))) >= FAR


@triton.jit
def _softmin_precise(C_hi, C_lo, q, logw_q, eps, damping, valid, AXIS: tl.constexpr):
    """-d eps LSE over AXIS of (logw_q + (q - C) / eps) with exponents, maxima, exponentials and sums in float64
    (see the module docstring: fp32 exponentials of these exponents were the largest error of the loss). The
    float64 work is done one column group of the tile at a time, in loops that are not unrolled: ptxas
    interleaves the float64 exponentials it is given together, and those of a whole 64 x 64 tile (16 a thread)
    spilled 88-96 bytes under triton 3.9 (0.7 KB under 3.6). Over the columns (AXIS 1) one loop takes the max
    over every group and a second sums the exponentials, each forming the group's exponents again (kept from
    one to the other, they spilled the symmetric 32 tile by 64 B). The max was once taken of the exponents
    formed in fp32, which are off by about |C| / eps 2^-24: 1e4 at blur 3e-7 (eps 9e-14, precise passes down to
    2.3e-11, costs up to 10), and the float64 exponentials relative to it overflowed (NaN potentials)."""
    inv_eps = 1.0 / eps
    h = logw_q + q * inv_eps
    group = tl.arange(0, C_hi.shape[0])[:, None, None]
    if AXIS == 1:
        m = tl.full((1, C_hi.shape[1], 1), float("-inf"), dtype=tl.float64)
        for j in tl.range(0, C_hi.shape[0], loop_unroll_factor=1):
            m = tl.maximum(m, tl.max(_exponents(C_hi, C_lo, _group(h, group, j), group, j, inv_eps), axis=2,
                                     keep_dims=True))
        m = _finite(m)
        s = tl.zeros(m.shape, dtype=tl.float64)
        for j in tl.range(0, C_hi.shape[0], loop_unroll_factor=1):
            z = _exponents(C_hi, C_lo, _group(h, group, j), group, j, inv_eps)
            s += tl.sum(tl.exp(z - m), axis=2, keep_dims=True)
    else:
        m = tl.zeros((C_hi.shape[0], 1, C_hi.shape[2]), dtype=tl.float64)
        s = tl.zeros(m.shape, dtype=tl.float64)
        for j in tl.range(0, C_hi.shape[0], loop_unroll_factor=1):
            z = _exponents(C_hi, C_lo, h, group, j, inv_eps)
            m_j = _finite(tl.max(z, axis=1, keep_dims=True))
            s = tl.where(group == j, tl.sum(tl.exp(z - m_j), axis=1, keep_dims=True), s)
            m = tl.where(group == j, m_j, m)
    out = -damping * eps * (m + tl.log(s))
    return tl.where(valid, out, 0.0)


@triton.jit
def _exponents(C_hi, C_lo, h, group, j, inv_eps):
    """h - C / eps in float64 on column group j of a resident tile (``_group``), h broadcast over it."""
    return h - (_group(C_hi, group, j).to(tl.float64) + _group(C_lo, group, j).to(tl.float64)) * inv_eps


@triton.jit
def _group(t, group, j):
    """Column group j of a resident tile or column vector (its axis 0: in each thread's registers), [1, ...]."""
    return tl.sum(tl.where(group == j, t, 0.0), axis=0, keep_dims=True)


@triton.jit
def _update(C_hi, C_lo, f, g, ft, gt, alpha, beta, alpha2, beta2, valid_n, valid_m, eps, precise, inv_rho,
            symmetric, eps_prev):
    """(T(g), T~(f)) at temperature eps on resident tiles; T~(f) = T(g) when ``symmetric`` (a runtime flag:
    one launch solves the debiased loss's three problems, ``_problem``). ft, gt: the previous update, at
    temperature eps_prev (the fast passes' ``_reference``; the current f, g at the first)."""
    damping = 1.0 / (1.0 + eps * inv_rho)
    if precise:
        ft = _softmin_precise(C_hi, C_lo, g, beta, eps, damping, valid_n, 1)
        if symmetric:
            gt = _transposed(ft, gt)
        else:
            gt = _softmin_precise(C_hi, C_lo, f, alpha, eps, damping, valid_m, 0)
    else:
        ft = _softmin_fast(C_hi, C_lo, _reference(ft, eps_prev, inv_rho), g, beta2, eps, damping, valid_n, 1)
        if symmetric:
            gt = _transposed(ft, gt)
        else:
            gt = _softmin_fast(C_hi, C_lo, _reference(gt, eps_prev, inv_rho), f, alpha2, eps, damping, valid_m, 0)
    return ft, gt


@triton.jit
def _transposed(v, like):
    """A row vector [1, n, 1] of a square resident tile as a column vector of the shape of ``like`` [GROUPS, 1,
    n / GROUPS] (a symmetric problem's g is its f): the sum over the rows of v on the tile's diagonal, exact (a
    reshape instead spilled 2-100 KB under triton 3.6 to 3.8)."""
    groups: tl.constexpr = like.shape[0]
    lanes: tl.constexpr = like.shape[2]
    rows = tl.arange(0, groups * lanes)[None, :, None]
    cols = (tl.arange(0, groups)[:, None] * lanes + tl.arange(0, lanes)[None, :])[:, None, :]
    return tl.sum(tl.where(rows == cols, v, 0.0), axis=1, keep_dims=True)


@triton.jit
def _schedule(SCHED):
    """(eps, 1 / rho, n_anneal, eps_init) of a schedule buffer (float64, see ``_anneal_eps``)."""
    eps = tl.load(SCHED)
    n_anneal = _n_anneal(SCHED)
    eps_init = tl.where(n_anneal > 0, _anneal_eps(SCHED, 0, n_anneal), eps)
    return eps, tl.load(SCHED + 1), n_anneal, eps_init


@triton.jit
def _n_anneal(SCHED):
    """The number of annealing temperatures: derived from the diameter, or the length of the explicit list."""
    diameter = tl.load(SCHED + 2)
    start, end, step = 2.0 * tl.log(tl.maximum(diameter, 1e-300)), tl.load(SCHED + 3), tl.load(SCHED + 4)
    derived = tl.maximum(tl.ceil((end - start) / step), 0.0) + 2.0
    return tl.where(diameter > 0.0, derived, tl.load(SCHED + 6)).to(tl.int32)


@triton.jit
def _anneal_eps(SCHED, t, n_anneal):
    """Temperature t of the annealing list. SCHED (float64) = [eps, 1 / rho, diameter, 2 log blur,
    2 log scaling, blur^2, n_list, list...]: with diameter > 0 the list is GeomLoss's ``epsilon_schedule``
    derived here, as ``otfast.schedule`` builds it on the host (diameter^2, exp(2 log diameter + i 2 log
    scaling) for i = 0, 1, ..., blur^2), so that no host needs to read the diameter; with diameter = 0 it is
    the n_list explicit temperatures that follow. Only temperatures 0 <= t < n_anneal of an explicit list are
    read (the buffer of a derived list ends at index 6)."""
    diameter = tl.load(SCHED + 2)
    start = 2.0 * tl.log(tl.maximum(diameter, 1e-300))
    derived = tl.where(t == 0, diameter * diameter,
                       tl.where(t == n_anneal - 1, tl.load(SCHED + 5), tl.exp(start + (t - 1) * tl.load(SCHED + 4))))
    explicit = tl.load(SCHED + 7 + t, mask=(diameter <= 0.0) & (t >= 0) & (t < n_anneal), other=0.0)
    return tl.where(diameter > 0.0, derived, explicit)


@triton.jit
def _schedule_step(SCHED, t, n_anneal, eps_init, eps, threshold):
    """``(eps_t, precise, annealing, w_old, eps_prev)`` of trip t of the streaming kernel's one loop over
    ``otfast.schedule``'s steps: t = 0 initialises at eps_init (the update replaces the zero potentials:
    w_old = 0), t = 1..n_anneal anneal, later trips iterate at the final eps (each kept update averages:
    w_old = 1/2). The loop stops after the first update it does not keep (n_iters reached, or the residual at
    or below tol): that is the final step, and the potentials it started from are f_prev, g_prev. Passes
    above ``threshold`` run in float64. eps_prev is the temperature of trip t - 1 (eps_init at t = 0), whose
    update is the fast passes' ``_reference``.

    The streaming kernel needs the one update call site (three, with both soft-min sweeps inlined at each,
    spilled 172 B on sm_90). The resident kernel keeps three sites instead, the same steps unrolled: its
    final loop is compiled for fast passes only (572 SASS instructions per iteration on its common path,
    README), and the one-loop form spilled 4 B under triton 3.7.1."""
    annealing = t <= n_anneal
    e = _step_eps(SCHED, t, n_anneal, eps_init, eps)
    e_prev = _step_eps(SCHED, tl.maximum(t - 1, 0), n_anneal, eps_init, eps)
    return e, annealing & (e > threshold), annealing, tl.where(t == 0, 0.0, 0.5), e_prev


@triton.jit
def _step_eps(SCHED, t, n_anneal, eps_init, eps):
    """The temperature of trip t (``_schedule_step``)."""
    return tl.where(t == 0, eps_init, tl.where(t <= n_anneal, _anneal_eps(SCHED, t - 1, n_anneal), eps))


@triton.jit
def _valid(LOGW, offs, in_range):
    """Which of the rows offs are tokens: log-weight > -inf (padding and rows past the end are not)."""
    return tl.load(LOGW + offs, mask=in_range, other=float("-inf")) > float("-inf")


@triton.jit
def _problem(p, N, M):
    """``(rows from y, columns from y, rows, columns)`` of problem p of the loss: 0 = OT(x, y), 1 = OT(x, x),
    2 = OT(y, y) (x: N points, y: M). Problems 1 and 2 are symmetric (one potential, f = g). The solvers
    run problems FIRST + program_id(1): one launch solves the three of the debiased loss, whose programs
    then run side by side instead of in three launches, one after the other."""
    return p == 2, p != 1, tl.where(p == 2, M, N), tl.where(p == 1, N, M)


@triton.jit
def _pick(p, A0, A1, A2):
    """A_p: the argument (a pointer) of problem p."""
    return tl.where(p == 0, A0, tl.where(p == 1, A1, A2))


@triton.jit
def _pick4(j, A0, A1, A2, A3):
    """A_j of four (the gradient terms of ``_grad_kernel``)."""
    return tl.where(j == 3, A3, _pick(j, A0, A1, A2))


@triton.jit
def _operand(from_y, X, Y, pid, sxb, sxn, sxd, syb, sym, syd):
    """``(pointer, row stride, feature stride)`` of pair pid's points x, or y when from_y."""
    return tl.where(from_y, Y + pid * syb, X + pid * sxb), tl.where(from_y, sym, sxn), tl.where(from_y, syd, sxd)


@triton.jit
def _weights(from_y, ALPHA, BETA, pid, N, M):
    """Pair pid's log-weights of x (ALPHA, [B, N]), or of y (BETA, [B, M]) when from_y."""
    return tl.where(from_y, BETA + pid * M, ALPHA + pid * N)


@triton.jit
def _cost_base(p, FIRST, N, M):
    """Where problem p's cost [B, rows, columns] starts in the buffer that packs those of problems FIRST,
    FIRST + 1, ..., p (``_cost_kernel``)."""
    b = tl.num_programs(0).to(tl.int64)  # in int64 before any product: B N M can pass 2^31
    return tl.where((FIRST == 0) & (p > 0), b * N * M, 0) + tl.where((FIRST <= 1) & (p > 1), b * N * N, 0)


@triton.jit
def _centred(P, MU, offs_a, ok_a, offs_b, ok_b, s_a, s_b, smd, FEATURES: tl.constexpr):
    """A tile of prepared points in float64: rows P[offs] - mu (the pair's centre), 0 where not ok. The
    feature axis is FEATURES (0 or 1) and indexes MU; padding rows are masked out of the load, so junk
    (NaN, inf) there is never read."""
    ok = ok_a[:, None] & ok_b[None, :]
    p = tl.load(P + offs_a[:, None] * s_a + offs_b[None, :] * s_b, mask=ok, other=0.0).to(tl.float64)
    if FEATURES == 0:
        mu = tl.load(MU + offs_a * smd, mask=ok_a, other=0.0)[:, None]
    else:
        mu = tl.load(MU + offs_b * smd, mask=ok_b, other=0.0)[None, :]
    return tl.where(ok, p - mu, 0.0)


@triton.jit
def _cost_tile_outer(Xp, Yp, MUp, offs_n, offs_m, ok_n, ok_m, D, sxn, sxd, sym, syd, smd):
    """The resident cost tile of the prepared points (``_centred``; ok_n, ok_m: the
    valid rows and columns) as D rank-1 float64 FMA updates, returned as (C_hi, C_lo). The accumulator keeps
    the tile's layout, which both reductions of the loop use (a tl.dot result would need layout conversions
    that cost registers the resident tiles cannot spare)."""
    acc = tl.zeros((offs_m.shape[0], offs_n.shape[1], offs_m.shape[2]), dtype=tl.float64)
    xx = tl.zeros(offs_n.shape, dtype=tl.float64)
    yy = tl.zeros(offs_m.shape, dtype=tl.float64)
    for kk in range(0, D):
        mu = tl.load(MUp + kk * smd)
        xk = tl.where(ok_n, tl.load(Xp + offs_n * sxn + kk * sxd, mask=ok_n, other=0.0).to(tl.float64) - mu, 0.0)
        yk = tl.where(ok_m, tl.load(Yp + offs_m * sym + kk * syd, mask=ok_m, other=0.0).to(tl.float64) - mu, 0.0)
        acc += xk * yk
        xx += xk * xk
        yy += yk * yk
    return _split(tl.maximum(0.5 * xx + 0.5 * yy - acc, 0.0))


@triton.jit
def _cost_tile_dot(Xp, Yp, MUp, offs_n, offs_m, ok_n, ok_m, D, sxn, sxd, sym, syd, smd,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_STAGES: tl.constexpr):
    """C_ij = |x_i|^2/2 + |y_j|^2/2 - <x_i, y_j> of the prepared points (``_centred``) for one tile with
    float64 ``tl.dot`` (DMMA), as (C_hi, C_lo). Each lane sums the squares of the features it loads across the
    BLOCK_K steps, and the norms are reduced once, after the last: no shuffle or barrier per step for them.
    K_STAGES: the steps' software-pipelining stages (``STAGES``, or 1)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float64)
    xx = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float64)
    yy = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float64)
    for k0 in tl.range(0, D, BLOCK_K, num_stages=K_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < D
        xt = _centred(Xp, MUp, offs_n, ok_n, offs_k, in_k, sxn, sxd, smd, 1)
        yt = _centred(Yp, MUp, offs_k, in_k, offs_m, ok_m, syd, sym, smd, 0)
        acc = tl.dot(xt, yt, acc, out_dtype=tl.float64)
        xx += xt * xt
        yy += yt * yt
    half = 0.5 * tl.sum(xx, axis=1)[:, None] + 0.5 * tl.sum(yy, axis=0)[None, :]
    return _split(tl.maximum(half - acc, 0.0))


@triton.jit
def _valid_sum(P, LOGW, n_rows, s_row, s_col, offs_d, in_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(sum of the valid rows of P over columns offs_d in float64, per-lane counts of the valid rows)."""
    total = tl.zeros((BLOCK_D,), dtype=tl.float64)
    count = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for r0 in range(0, n_rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        ok = _valid(LOGW, offs_r, offs_r < n_rows)
        p = tl.load(P + offs_r[:, None] * s_row + offs_d[None, :] * s_col, mask=ok[:, None] & in_d[None, :], other=0.0)
        total += tl.sum(p.to(tl.float64), axis=0)
        count += ok.to(tl.float64)
    return total, count


@triton.jit
def _centre_kernel(X, Y, ALPHA, BETA, MU, N, M, D, sxb, sxn, sxd, syb, sym, syd,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """MU[p, b] = the mean of the valid points of problem p (``_problem``) of pair b: x and y together, x, y
    (float64 [3, B, D]): the centre the cost kernels subtract, so that the norm expansion of the cost does
    not cancel. Grid (B, D blocks)."""
    pid = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    tx, cx = _valid_sum(X + pid * sxb, ALPHA + pid * N, N, sxn, sxd, offs_d, in_d, BLOCK_R, BLOCK_D)
    ty, cy = _valid_sum(Y + pid * syb, BETA + pid * M, M, sym, syd, offs_d, in_d, BLOCK_R, BLOCK_D)
    cx, cy = tl.sum(cx, axis=0), tl.sum(cy, axis=0)
    out = MU + pid * D + offs_d
    _store_mean(out, tx + ty, cx + cy, in_d)
    _store_mean(out + tl.num_programs(0) * D, tx, cx, in_d)
    _store_mean(out + 2 * tl.num_programs(0) * D, ty, cy, in_d)


@triton.jit
def _valid_bounds(P, MASK, n_rows, s_row, s_col, offs_d, in_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(largest, least) coordinate over the valid rows of P (MASK != 0) in columns offs_d, in P's dtype (-inf,
    inf where there is none)."""
    hi = tl.full((BLOCK_D,), float("-inf"), P.dtype.element_ty)
    lo = tl.full((BLOCK_D,), float("inf"), P.dtype.element_ty)
    for r0 in range(0, n_rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        ok = (tl.load(MASK + offs_r, mask=offs_r < n_rows, other=0) != 0)[:, None] & in_d[None, :]
        p = tl.load(P + offs_r[:, None] * s_row + offs_d[None, :] * s_col, mask=ok, other=0.0)
        hi = tl.maximum(hi, tl.max(tl.where(ok, p, float("-inf")), axis=0))
        lo = tl.minimum(lo, tl.min(tl.where(ok, p, float("inf")), axis=0))
    return hi, lo


@triton.jit
def _bounds_kernel(X, Y, MASK_X, MASK_Y, OUT_BOUNDS, N, M, D, sxb, sxn, sxd, syb, sym, syd,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT_BOUNDS[b, 0] = the largest coordinates of pair b's valid points (x and y together), OUT_BOUNDS[b, 1] =
    minus the least ([B, 2, D] in the points' dtype; -inf where the pair has none), so that the batch's box is
    one max over pairs and its sides one sum: what ``otfast.schedule.bounding_diameter`` takes the diagonal of.
    Grid (B, D blocks)."""
    pid = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    hx, lx = _valid_bounds(X + pid * sxb, MASK_X + pid * N, N, sxn, sxd, offs_d, in_d, BLOCK_R, BLOCK_D)
    hy, ly = _valid_bounds(Y + pid * syb, MASK_Y + pid * M, M, sym, syd, offs_d, in_d, BLOCK_R, BLOCK_D)
    out = OUT_BOUNDS + pid * 2 * D + offs_d
    tl.store(out, tl.maximum(hx, hy), mask=in_d)
    tl.store(out + D, -tl.minimum(lx, ly), mask=in_d)


@triton.jit
def _store_mean(OUT, total, count, mask):
    tl.store(OUT, tl.where(count > 0.0, total / tl.maximum(count, 1.0), 0.0), mask=mask)


@triton.jit
def _load_weights(from_y, ALPHA, BETA, pid, N, M, offs, in_range, spread):
    """Pair pid's log-weights (``_weights``) at offs (-inf past the pair), broadcast over the offsets spread (0:
    the vector alone)."""
    return tl.load(_weights(from_y, ALPHA, BETA, pid, N, M) + offs + 0 * spread, mask=in_range & (spread >= 0),
                   other=float("-inf"))


@triton.jit
def _sinkhorn_resident_kernel(
        X, Y, MU, COST, ALPHA, BETA, SCHED, F0, F1, F2, FP0, FP1, FP2, G, G_PREV, ITERS, ERR,
        N, M, D, FIRST, sxb, sxn, sxd, syb, sym, syd, smp, smb, smd, scb, scn, scm, n_iters, tol,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, FROM_POINTS: tl.constexpr,
        ANCHOR: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_TOL: tl.constexpr):
    """One pair and problem per program (grid (B, problems): problem FIRST + program_id(1), ``_problem``),
    both cost tiles in registers, every iteration on chip.

    The tiles are [GROUPS, BLOCK_N, BLOCK_M / GROUPS]: column j = BLOCK_M / GROUPS x group + lane, so that
    triton's default layout spreads a warp's lanes over rows as well as columns (a [BLOCK_N, BLOCK_M] tile
    puts all 32 along the columns, and at 64 x 64 each thread would hold 16 entries of every float64 row
    vector). Vectors keep the tile's rank, [1, BLOCK_N, 1] over the rows and [GROUPS, 1, BLOCK_M / GROUPS] over
    the columns, and broadcast against it as they are (``_max_over``, ``_sum_over`` keep it too). ANCHOR: the
    weights are read as whole tiles (each thread loads its 16 entries once) and reduced to vectors, which
    gives the layout pass an anchor in the tile's layout: the loop-carried vectors then keep it (4 values a
    thread, where their own layout holds 1) and no pass converts one through shared memory (at 64 x 64, 18
    barriers an iteration instead of 44, for 1,088 instructions instead of 877, 1,089 since the precise passes
    take their max in float64; ``configs.RESIDENT_TILES``).

    SYMMETRIC: None, each program's problem says whether it is symmetric (the points' kernels: one launch
    mixes both kinds); True or False for the one problem of a precomputed cost, where that decided at run
    time spilled 0.6-70 KB under triton 3.6 to 3.8.

    Problem p writes f to F_p and f_prev to FP_p ([B, rows] float64); problem 0 also writes g, g_prev to G,
    G_PREV; ITERS, ERR (float64) are [problems, B]. MU is [3, B, D] (``_centre_kernel``; strides smp, smb,
    smd). SCHED: the schedule buffer of ``_anneal_eps`` (the annealing list may live on the device only)."""
    pid = tl.program_id(0).to(tl.int64)
    p = FIRST + tl.program_id(1)
    rows_y, cols_y, n, m = _problem(p, N, M)
    if SYMMETRIC is None:
        symmetric = p > 0
    else:
        symmetric = SYMMETRIC
    offs_n = tl.arange(0, BLOCK_N)[None, :, None]
    lanes: tl.constexpr = BLOCK_M // GROUPS
    offs_m = (tl.arange(0, GROUPS)[:, None] * lanes + tl.arange(0, lanes)[None, :])[:, None, :]
    in_n = offs_n < n
    in_m = offs_m < m
    if ANCHOR:  # read as tiles, reduced to vectors: the layout pass anchors the vectors on the tile's layout
        alpha = _max_over(_load_weights(rows_y, ALPHA, BETA, pid, N, M, offs_n, in_n, offs_m), 1)
        beta = _max_over(_load_weights(cols_y, ALPHA, BETA, pid, N, M, offs_m, in_m, offs_n), 0)
    else:
        alpha = _load_weights(rows_y, ALPHA, BETA, pid, N, M, offs_n, in_n, 0)
        beta = _load_weights(cols_y, ALPHA, BETA, pid, N, M, offs_m, in_m, 0)
    alpha2 = (alpha * LOG2E).to(tl.float32)
    beta2 = (beta * LOG2E).to(tl.float32)
    valid_n = alpha > float("-inf")
    valid_m = beta > float("-inf")
    w_n = tl.exp2(alpha2)
    w_m = tl.exp2(beta2)
    if FROM_POINTS:
        Rp, srn, srd = _operand(rows_y, X, Y, pid, sxb, sxn, sxd, syb, sym, syd)
        Cp, scn_, scd = _operand(cols_y, X, Y, pid, sxb, sxn, sxd, syb, sym, syd)
        C_hi, C_lo = _cost_tile_outer(Rp, Cp, MU + p * smp + pid * smb, offs_n, offs_m, valid_n, valid_m, D,
                                      srn, srd, scn_, scd, smd)
    else:
        C_hi, C_lo = _split(tl.load(COST + pid * scb + offs_n * scn + offs_m * scm, mask=in_n & in_m, other=0.0))
    eps, inv_rho, n_anneal, eps_init = _schedule(SCHED)
    threshold = eps * PRECISE_RATIO

    f = tl.zeros((1, BLOCK_N, 1), dtype=tl.float64)
    g = tl.zeros((GROUPS, 1, lanes), dtype=tl.float64)
    f, g = _update(C_hi, C_lo, f, g, f, g, alpha, beta, alpha2, beta2, valid_n, valid_m, eps_init,
                   eps_init > threshold, inv_rho, symmetric, eps_init)
    ft, gt = f, g
    e_prev = eps_init
    for t in range(n_anneal):
        e = _anneal_eps(SCHED, t, n_anneal)
        ft, gt = _update(C_hi, C_lo, f, g, ft, gt, alpha, beta, alpha2, beta2, valid_n, valid_m, e, e > threshold,
                         inv_rho, symmetric, e_prev)
        f = (f + ft) * 0.5
        g = (g + gt) * 0.5
        e_prev = e

    it = n_iters * 0
    go = n_iters > 0
    while go:  # the final temperature: fast passes
        ft, gt = _update(C_hi, C_lo, f, g, ft, gt, alpha, beta, alpha2, beta2, valid_n, valid_m, eps, False, inv_rho,
                         symmetric, e_prev)
        e_prev = eps
        active = go
        if HAS_TOL:
            err = _residual(f, ft, w_n, eps) + _residual(g, gt, w_m, eps)
            active = err > tol
        f = tl.where(active, (f + ft) * 0.5, f)
        g = tl.where(active, (g + gt) * 0.5, g)
        it += active.to(tl.int32)
        go = active & (it < n_iters)

    f_new, g_new = _update(C_hi, C_lo, f, g, ft, gt, alpha, beta, alpha2, beta2, valid_n, valid_m, eps, False,
                           inv_rho, symmetric, e_prev)
    err = _residual(f, f_new, w_n, eps) + _residual(g, g_new, w_m, eps)
    tl.store(_pick(p, F0, F1, F2) + pid * n + offs_n, f_new, mask=in_n)
    tl.store(_pick(p, FP0, FP1, FP2) + pid * n + offs_n, f, mask=in_n)
    if not symmetric:  # a symmetric problem's g is its f
        tl.store(G + pid * m + offs_m, g_new, mask=in_m)
        tl.store(G_PREV + pid * m + offs_m, g, mask=in_m)
    out = tl.program_id(1) * tl.num_programs(0) + pid
    tl.store(ITERS + out, n_anneal + it)
    tl.store(ERR + out, err)


@triton.jit
def _cost_kernel(X, Y, MU, ALPHA, BETA, COST_HI, COST_LO, N, M, D, FIRST, sxb, sxn, sxd, syb, sym, syd, smp, smb,
                 smd, n_tiles_n, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """COST_HI + COST_LO = |x_i - y_j|^2 / 2 of the prepared points (``_centred``) of problem FIRST +
    program_id(1) // n_tiles_n (``_problem``) tile by tile (float64 accumulation): fp32 each, problem p's
    contiguous [B, rows, columns] at ``_cost_base``. Grid (B, problems x n_tiles_n row tiles, column
    tiles), both counts those of the longest problem (a grid's second and third axes stop at 65535); a
    tile past a shorter problem's end computes and stores nothing."""
    pid = tl.program_id(0).to(tl.int64)
    p = FIRST + tl.program_id(1) // n_tiles_n
    rows_y, cols_y, n, m = _problem(p, N, M)
    row0, col0 = (tl.program_id(1) % n_tiles_n) * BLOCK_N, tl.program_id(2) * BLOCK_M
    offs_n = row0 + tl.arange(0, BLOCK_N)
    offs_m = col0 + tl.arange(0, BLOCK_M)
    in_n = offs_n < n
    in_m = offs_m < m
    ok_n = _valid(_weights(rows_y, ALPHA, BETA, pid, N, M), offs_n, in_n)
    ok_m = _valid(_weights(cols_y, ALPHA, BETA, pid, N, M), offs_m, in_m)
    Rp, srn, srd = _operand(rows_y, X, Y, pid, sxb, sxn, sxd, syb, sym, syd)
    Cp, scn, scd = _operand(cols_y, X, Y, pid, sxb, sxn, sxd, syb, sym, syd)
    live = (row0 < n) & (col0 < m)
    C_hi, C_lo = _cost_tile_dot(Rp, Cp, MU + p * smp + pid * smb, offs_n, offs_m, ok_n, ok_m, tl.where(live, D, 0), srn,
                                srd, scn, scd, smd, BLOCK_N, BLOCK_M, BLOCK_K, 1)
    offs = _cost_base(p, FIRST, N, M) + pid * n * m + offs_n[:, None] * m + offs_m[None, :]
    tl.store(COST_HI + offs, C_hi, mask=in_n[:, None] & in_m[None, :])
    tl.store(COST_LO + offs, C_lo, mask=in_n[:, None] & in_m[None, :])


@triton.jit
def _stream_softmin(CH, CL, CK, s_row, s_col, s_rd, s_cd, MU, smd, D, n_rows, n_cols, LOGW_COL, POT_COL, REF,
                    LOGW_ROW, OUT, A_ROW, A_COL, WQ, eps, inv_rho, precise, eps_ref, anchored, drift,
                    ABSORB: tl.constexpr, FROM_POINTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """OUT_i = T(q)_i = -d eps LSE_j(logw_j + (q_j - C_ij) / eps) for every row i, over column tiles: precise
    passes online in float64, fast ones relative to the ``_reference`` of REF, the rows' previous update at
    temperature eps_ref (as ``_softmin_fast``). OUT may be REF: each row reads its reference before it
    writes.

    ABSORB (the streaming kernel; not the split kernel, whose programs would need a grid barrier between a
    pass that stores and one that reads): a fast pass reads the absorbed cost CK = C - a_i - b_j (fp32, the
    anchors a = A_ROW of the rows, b = A_COL of the columns, fp32) where the last pass left it (``anchored``)
    and neither the references nor q have drifted ``drift`` binary orders or more from the anchors
    (``_stream_anchored``): its exponent is then wq_j + wp_i - CK_ij k, two fp32 operations instead of the
    cost's ten (``_stream_sum2_absorbed``; wq_j, the column's part, stored in WQ by the drift check).
    Otherwise the pass forms its exponents from the cost (C_hi, C_lo) as before, and where the temperature
    is that of the previous step (eps_ref: not an annealing step after the first, whose next pass is at a
    temperature scaling^2 times smaller, where the potentials have drifted tens of binary orders) stores them
    as the new CK, anchored on the rounded reference (the rows) and q (the columns). An annealing pass reads
    CK only if it is within the drift bound, which at the goal points none is (``benchmarks.sweeps``).

    The column pass of the loop is this same routine on the transposed cost (strides swapped)."""
    damping = 1.0 / (1.0 + eps * inv_rho)
    absorbed = anchored & ~precise
    if ABSORB:
        if not precise:
            if anchored:
                absorbed = _stream_anchored(REF, POT_COL, A_ROW, A_COL, LOGW_ROW, LOGW_COL, WQ, n_rows, n_cols, eps,
                                            eps_ref, inv_rho, drift, VECTOR)
            # every warp has read the anchors it decided on before any overwrites them (a warp that read a
            # new anchor could decide otherwise than the others), and the row blocks read WQ across the vector
            tl.debug_barrier()
            _stream_columns(A_COL, POT_COL, n_cols, absorbed, eps == eps_ref, VECTOR)
    for r0 in range(0, n_rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < n_rows
        valid = _valid(LOGW_ROW, offs_r, in_r)
        if precise:  # on half-width tiles: the float64 exponentials of full ones spilled the absorbed kernel
            out = _stream_lse_precise(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, n_cols,
                                      LOGW_COL, POT_COL, eps, damping, FROM_POINTS, BLOCK_R, BLOCK_C // 2, BLOCK_K)
        else:
            ref = _reference(tl.load(REF + offs_r, mask=in_r, other=0.0), eps_ref, inv_rho)
            out = _stream_lse_fast(CH, CL, CK, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, n_cols,
                                   LOGW_COL, POT_COL, A_ROW, WQ, ref, eps, damping, absorbed, eps == eps_ref, ABSORB,
                                   FROM_POINTS, BLOCK_R, BLOCK_C, BLOCK_K)
        tl.store(OUT + offs_r, tl.where(valid, out, 0.0), mask=in_r)


@triton.jit
def _stream_anchored(REF, POT_COL, A_ROW, A_COL, LOGW_ROW, LOGW_COL, WQ, n_rows, n_cols, eps, eps_ref, inv_rho, drift,
                     BLOCK: tl.constexpr):
    """Whether every valid row's reference (``_reference`` of REF) and every valid column's q (POT_COL) lies
    within ``drift`` binary orders at temperature eps of its anchor (A_ROW, A_COL): then the absorbed
    exponents carry a rounding of at most about (3 drift + NEAR + 24 + log2(1 / w_min)) 2^-24. The trips over
    the columns also store each column's part of an absorbed pass's exponent, WQ_j = log2(w_j) + (q_j - b_j) k
    (fp32; -inf for padding; b = A_COL), which a pass that does not read the absorbed cost leaves unread: one
    trip over the columns per pass instead of two, in turn."""
    k = (1.0 / eps) * LOG2E
    gap = tl.zeros((BLOCK,), dtype=tl.float64)
    for o in range(0, n_rows, BLOCK):
        offs = o + tl.arange(0, BLOCK)
        inb = offs < n_rows
        ref = _reference(tl.load(REF + offs, mask=inb, other=0.0), eps_ref, inv_rho)
        a = tl.load(A_ROW + offs, mask=inb, other=0.0).to(tl.float64)
        gap = tl.maximum(gap, tl.where(_valid(LOGW_ROW, offs, inb), tl.abs(ref - a), 0.0))
    for o in range(0, n_cols, BLOCK):
        offs = o + tl.arange(0, BLOCK)
        inb = offs < n_cols
        b = tl.load(A_COL + offs, mask=inb, other=0.0).to(tl.float64)
        q = tl.load(POT_COL + offs, mask=inb, other=0.0)
        lw = tl.load(LOGW_COL + offs, mask=inb, other=float("-inf"))
        tl.store(WQ + offs, (lw * LOG2E + (q - b) * k).to(tl.float32), mask=inb)
        gap = tl.maximum(gap, tl.where(lw > float("-inf"), tl.abs(q - b), 0.0))
    return tl.max(gap, axis=0) * k < drift


@triton.jit
def _stream_columns(A_COL, POT_COL, n_cols, absorbed, store, BLOCK: tl.constexpr):
    """Before a pass that stores the absorbed cost (``store`` and not ``absorbed``), the columns' new anchors
    A_COL_j = fp32(q_j)."""
    if store and not absorbed:
        for o in range(0, n_cols, BLOCK):
            offs = o + tl.arange(0, BLOCK)
            inb = offs < n_cols
            tl.store(A_COL + offs, tl.load(POT_COL + offs, mask=inb, other=0.0).to(tl.float32), mask=inb)
        # the column pass reads these (see _stream_update)
        tl.debug_barrier()


@triton.jit
def _stream_lse_precise(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, n_cols, LOGW_COL, POT_COL,
                        eps, damping, FROM_POINTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """-d eps LSE over the columns for one row block, online: exponents, max, exponentials and sum in float64."""
    inv_eps = 1.0 / eps
    m_run = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float64)
    s_run = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for c0 in range(0, n_cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        in_c = offs_c < n_cols
        lw = tl.load(LOGW_COL + offs_c, mask=in_c, other=float("-inf"))
        h = lw + tl.load(POT_COL + offs_c, mask=in_c, other=0.0) * inv_eps
        C_hi, C_lo = _stream_tile(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, offs_c, in_c,
                                  lw > float("-inf"), FROM_POINTS, BLOCK_R, BLOCK_C, BLOCK_K)
        z = h[None, :] - (C_hi.to(tl.float64) + C_lo.to(tl.float64)) * inv_eps
        m_new = tl.maximum(m_run, tl.max(z, axis=1))
        m_safe = _finite(m_new)
        s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m_run = m_new
    return -damping * eps * (_finite(m_run) + tl.log(s_run))


@triton.jit
def _stream_lse_fast(CH, CL, CK, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, n_cols, LOGW_COL, POT_COL,
                     A_ROW, WQ, ref, eps, damping, absorbed, store, ABSORB: tl.constexpr, FROM_POINTS: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """d (p - eps ln2 LSE2) for one row block, p the fp32 rounding of the reference ``ref``: one sweep over the
    column tiles sums the exponentials of the exponents relative to p itself and takes their max m
    (``_stream_sum2``; with ABSORB and ``store`` it stores the absorbed cost and the rows' anchors as it goes,
    or, when ``absorbed``, reads that cost instead, relative to the anchor plus the fp32 drift:
    ``_stream_softmin``);
    where some valid row's |m| reaches ``NEAR`` (``_near``; that sum may then have overflowed or lost every
    term), a second sweep sums them online from the cost relative to the reference shifted onto m
    (``_stream_lse2``, ``_shifted``; its running max also covers ``_far``'s case)."""
    k = ((1.0 / eps) * LOG2E).to(tl.float32)
    ph, _ = _split(ref)
    base = ph.to(tl.float64)
    if ABSORB:
        if absorbed:
            # the exponents are relative to a + wp / k, which the fp32 wp represents exactly (not to ref)
            a = tl.load(A_ROW + offs_r, mask=in_r, other=0.0).to(tl.float64)
            wp = ((ref - a) * ((1.0 / eps) * LOG2E)).to(tl.float32)
            m, s = _stream_sum2_absorbed(CK, s_row, s_col, offs_r, in_r, n_cols, WQ, wp, k, BLOCK_R, BLOCK_C)
            base = a + wp.to(tl.float64) * (eps * LN2)
        elif store:
            tl.store(A_ROW + offs_r, ph, mask=in_r)
            m, s = _stream_sum2(CH, CL, CK, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, n_cols,
                                LOGW_COL, POT_COL, ph, k, True, FROM_POINTS, BLOCK_R, BLOCK_C, BLOCK_K)
        else:
            m, s = _stream_sum2(CH, CL, CK, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, n_cols,
                                LOGW_COL, POT_COL, ph, k, False, FROM_POINTS, BLOCK_R, BLOCK_C, BLOCK_K)
    else:
        m, s = _stream_sum2(CH, CL, CK, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, n_cols, LOGW_COL,
                            POT_COL, ph, k, False, FROM_POINTS, BLOCK_R, BLOCK_C, BLOCK_K)
    c = tl.zeros_like(m)
    if not _near(m, valid):
        ph, _ = _shifted(ph, m, eps)
        c, s = _stream_lse2(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, n_cols, LOGW_COL,
                            POT_COL, ph, k, FROM_POINTS, BLOCK_R, BLOCK_C, BLOCK_K)
        base = ph.to(tl.float64)
    return damping * (base - (eps * LN2) * (c.to(tl.float64) + tl.log2(s)))


@triton.jit
def _stream_lse2(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, n_cols, LOGW_COL, POT_COL, ph, k,
                 FROM_POINTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(c, s)``: LSE2 over the column tiles of the fast exponents relative to ph = c + log2(s), online (c the
    running max, 0 for a row with every entry masked; s float64)."""
    c = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for c0 in range(0, n_cols, BLOCK_C):
        z = _stream_exponents(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, c0, n_cols,
                              LOGW_COL, POT_COL, ph, k, FROM_POINTS, BLOCK_R, BLOCK_C, BLOCK_K)
        c_new = tl.maximum(c, tl.max(z, axis=1))
        s = s * tl.exp2(c - _finite(c_new)).to(tl.float64) + tl.sum(tl.exp2(z - _finite(c_new)[:, None]),
                                                                       axis=1).to(tl.float64)
        c = c_new
    return _finite(c), s


@triton.jit
def _stream_sum2(CH, CL, CK, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, n_cols, LOGW_COL, POT_COL, ph,
                 k, STORE: tl.constexpr, FROM_POINTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """``(m, s)``: the max over the column tiles of the fast exponents relative to ph, and the sum of their
    exponentials as they are (no offset: what counts for a row whose |m| is below ``NEAR``, where s lies
    between 2^-NEAR and columns x 2^NEAR). Each lane keeps its own max and fp32 sum across the tiles (at N =
    M = 2048, 64 terms each), and the row block reduces them once, after its last tile: no barrier or
    shuffle per tile. STORE: each tile's C - ph - qh (``_fast_exponents``' u) is also stored in CK, the absorbed
    cost anchored on ph and qh. From the packed cost each trip loads the next tile (and its columns'
    potentials and weights) into registers before computing on this one, so the tiles' loads overlap the
    exponentials instead of waiting in turn; tiles formed from the points are formed in turn (the next one's
    DMMA steps would keep both tiles live)."""
    mx = tl.full((BLOCK_R, BLOCK_C), float("-inf"), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    if not FROM_POINTS:
        tile = _column_tile(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, 0, n_cols, LOGW_COL,
                            POT_COL, False, BLOCK_R, BLOCK_C, BLOCK_K)
    for c0 in range(0, n_cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        if FROM_POINTS:
            tile = _column_tile(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, c0, n_cols,
                                LOGW_COL, POT_COL, True, BLOCK_R, BLOCK_C, BLOCK_K)
            nxt = tile
        else:
            nxt = _column_tile(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, c0 + BLOCK_C, n_cols,
                               LOGW_COL, POT_COL, False, BLOCK_R, BLOCK_C, BLOCK_K)
        u, w2 = _tile_differences(tile, ph, k)
        tile = nxt
        if STORE:
            tl.store(CK + offs_r[:, None] * s_row + offs_c[None, :] * s_col, u,
                     mask=in_r[:, None] & (offs_c < n_cols)[None, :])
        z = w2[None, :] - u * k
        mx = tl.maximum(mx, z)
        acc += tl.exp2(z)
    return _finite(tl.max(mx, axis=1)), tl.sum(acc, axis=1).to(tl.float64)


@triton.jit
def _stream_sum2_absorbed(CK, s_row, s_col, offs_r, in_r, n_cols, WQ, wp, k, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """``_stream_sum2`` on the absorbed cost: the exponent relative to the reference is (wq_j + wp_i) - CK_ij k,
    with wp_i = (reference_i - a_i) k and wq_j = log2(w_j) + (q_j - b_j) k (``_stream_anchored``). Each trip
    loads the next tile (and its wq) into registers before it computes on this one, so the loads of a row
    block's tiles wait for each other only as long as a tile's exponentials take."""
    mx = tl.full((BLOCK_R, BLOCK_C), float("-inf"), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    wq, K = _absorbed_tile(CK, s_row, s_col, offs_r, in_r, n_cols, WQ, 0, BLOCK_C)
    for c0 in range(0, n_cols, BLOCK_C):
        wq_next, K_next = _absorbed_tile(CK, s_row, s_col, offs_r, in_r, n_cols, WQ, c0 + BLOCK_C, BLOCK_C)
        z = (wq[None, :] + wp[:, None]) - K * k
        mx = tl.maximum(mx, z)
        acc += tl.exp2(z)
        wq, K = wq_next, K_next
    return _finite(tl.max(mx, axis=1)), tl.sum(acc, axis=1).to(tl.float64)


@triton.jit
def _absorbed_tile(CK, s_row, s_col, offs_r, in_r, n_cols, WQ, c0, BLOCK_C: tl.constexpr):
    """``(wq, K)`` of the column tile at c0 (-inf and 0 past n_cols: nothing is read there)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    in_c = offs_c < n_cols
    wq = tl.load(WQ + offs_c, mask=in_c, other=float("-inf"))
    return wq, tl.load(CK + offs_r[:, None] * s_row + offs_c[None, :] * s_col, mask=in_r[:, None] & in_c[None, :],
                       other=0.0)


@triton.jit
def _stream_exponents(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, c0, n_cols, LOGW_COL, POT_COL,
                      ph, k, FROM_POINTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """The fast exponents (``_fast_exponents``) of the column tile at c0 of the streamed cost."""
    u, w2 = _tile_differences(_column_tile(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, c0,
                                           n_cols, LOGW_COL, POT_COL, FROM_POINTS, BLOCK_R, BLOCK_C, BLOCK_K), ph, k)
    return w2[None, :] - u * k


@triton.jit
def _column_tile(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, c0, n_cols, LOGW_COL, POT_COL,
                 FROM_POINTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(q, lw, C_hi, C_lo)`` of the column tile at c0 of a streamed problem: its columns' potentials and
    log-weights (0 and -inf past n_cols) and its cost (``_stream_tile``)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    in_c = offs_c < n_cols
    lw = tl.load(LOGW_COL + offs_c, mask=in_c, other=float("-inf"))
    C_hi, C_lo = _stream_tile(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, valid, offs_c, in_c,
                              lw > float("-inf"), FROM_POINTS, BLOCK_R, BLOCK_C, BLOCK_K)
    return tl.load(POT_COL + offs_c, mask=in_c, other=0.0), lw, C_hi, C_lo


@triton.jit
def _tile_differences(tile, ph, k):
    """``(u, w2)`` of a ``_column_tile``: u = C - ph - qh (``_differences``) and the columns' weights w2
    (``_fast_exponents``)."""
    q, lw, C_hi, C_lo = tile
    qh, ql = _split(q)
    return _differences(C_hi, C_lo, ph[:, None], qh[None, :]), (lw * LOG2E).to(tl.float32) + ql * k


@triton.jit
def _stream_tile(CH, CL, s_row, s_col, s_rd, s_cd, MU, smd, D, offs_r, in_r, ok_r, offs_c, in_c, ok_c,
                 FROM_POINTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(C_hi, C_lo)`` of one [rows, columns] tile of a streamed problem: loaded from its packed cost (CH, CL at
    strides s_row, s_col), or, FROM_POINTS, formed from the prepared points as ``_cost_kernel`` forms it (DMMA
    over the D features, in BLOCK_K steps): CH holds the rows' points (row stride s_row, feature stride s_rd),
    CL the columns' (s_col, s_cd), MU their centre (stride smd); only the valid rows ok_r and columns ok_c
    are read."""
    if FROM_POINTS:
        C_hi, C_lo = _cost_tile_dot(CH, CL, MU, offs_r, offs_c, ok_r, ok_c, D, s_row, s_rd, s_col, s_cd, smd, BLOCK_R,
                                    BLOCK_C, BLOCK_K, 1)
    else:
        tile = in_r[:, None] & in_c[None, :]
        C_hi = tl.load(CH + offs_r[:, None] * s_row + offs_c[None, :] * s_col, mask=tile, other=0.0)
        C_lo = tl.load(CL + offs_r[:, None] * s_row + offs_c[None, :] * s_col, mask=tile, other=0.0)
    return C_hi, C_lo


@triton.jit
def _stream_update(CH, CL, CK, s_r, s_c, s_rd, s_cd, MU, smd, D, N, M, ALPHA, BETA, F, G, FT, GT, AR, AC, WQ, r0, r1,
                   c0, c1, eps, precise, inv_rho, symmetric, first, eps_prev, anchored, drift, ABSORB: tl.constexpr,
                   FROM_POINTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """FT = T(G) on the rows r0..r1, GT = T~(F) on the columns c0..c1 (not for a symmetric problem, whose GT
    aliases FT) at temperature eps, streaming the [N, M] cost (the streaming kernel: every row and column;
    the split kernel: a program's share) as ``_stream_source`` gives it: the packed cost CH, CL (contiguous:
    s_r = M, s_c = 1), or FROM_POINTS the tiles formed from the rows' points CH and the columns' CL
    (``_stream_tile``). The fast passes' references are FT, GT, the previous update (at temperature
    eps_prev), except at the ``first`` (F, G then: FT, GT hold nothing yet).

    ABSORB: the fast passes read or store the absorbed cost CK (``_stream_softmin``), anchored on AR (the
    rows) and AC (the columns); WQ is a pass's scratch. ``anchored``: whether a fast pass stored them before
    (one at the previous step's temperature)."""
    RF, RG = tl.where(first, F, FT), tl.where(first, G, GT)
    if FROM_POINTS:  # the column pass's rows are the columns' points
        row_lo, col_hi, col_lo = CL, CL + c0 * s_c, CH
    else:  # the column pass reads the cost transposed
        row_lo, col_hi, col_lo = CL + r0 * s_r, CH + c0 * s_c, CL + c0 * s_c
    _stream_softmin(CH + r0 * s_r, row_lo, CK + r0 * M, s_r, s_c, s_rd, s_cd, MU, smd, D, r1 - r0, M, BETA, G, RF + r0,
                    ALPHA + r0, FT + r0, AR + r0, AC, WQ, eps, inv_rho, precise, eps_prev, anchored, drift, ABSORB,
                    FROM_POINTS, BLOCK_N, BLOCK_M, BLOCK_K)
    if not symmetric:
        if ABSORB:  # the column pass reads the anchors and CK the row pass may have stored, and reuses WQ
            tl.debug_barrier()
        _stream_softmin(col_hi, col_lo, CK + c0, s_c, s_r, s_cd, s_rd, MU, smd, D, c1 - c0, N, ALPHA, F, RG + c0,
                        BETA + c0, GT + c0, AC + c0, AR, WQ, eps, inv_rho, precise, eps_prev,
                        _stored(anchored, precise, eps, eps_prev), drift, ABSORB, FROM_POINTS, BLOCK_M, BLOCK_N,
                        BLOCK_K)
    # The program's warps wrote FT / GT through global memory, and the next step reads them across rows
    # other warps wrote: a block-wide barrier orders the two (global stores are visible to the block after it).
    tl.debug_barrier()


@triton.jit
def _stored(anchored, precise, eps, eps_prev):
    """Whether the absorbed cost and its anchors hold after a pass at temperature eps (the previous step's:
    eps_prev) that found them as ``anchored`` says: a fast pass at the previous step's temperature stores
    them where they did not hold (``_stream_softmin``)."""
    return anchored | (~precise & (eps == eps_prev))


@triton.jit
def _residual_lanes(P, PT, LOGW, offs, inb, eps):
    """``_residual``'s terms of the entries offs of a streamed vector (0 outside inb)."""
    w = tl.exp2((tl.load(LOGW + offs, mask=inb, other=float("-inf")) * LOG2E).to(tl.float32))
    return _residual_terms(tl.load(P + offs, mask=inb, other=0.0), tl.load(PT + offs, mask=inb, other=0.0), w, eps)


@triton.jit
def _stream_error(F, FT, G, GT, ALPHA, BETA, N, M, eps):
    """Residual of the rows plus the columns (twice the rows, exactly, for a symmetric problem, whose G, GT,
    BETA alias F, FT, ALPHA): one loop over both vectors, each with its own per-lane partial sums, reduced once
    at the end."""
    acc_f = tl.zeros((VECTOR,), dtype=tl.float32)
    acc_g = tl.zeros((VECTOR,), dtype=tl.float32)
    for o in range(0, tl.maximum(N, M), VECTOR):
        offs = o + tl.arange(0, VECTOR)
        acc_f += _residual_lanes(F, FT, ALPHA, offs, offs < N, eps)
        acc_g += _residual_lanes(G, GT, BETA, offs, offs < M, eps)
    return tl.sum(acc_f, axis=0) + tl.sum(acc_g, axis=0)


@triton.jit
def _combine(P, PT, offs, inb, w_old):
    """P <- w_old P + (1 - w_old) PT on the entries offs (inb): 0 copies (the init), 0.5 averages (the
    symmetric update)."""
    p = tl.load(P + offs, mask=inb, other=0.0)
    pt = tl.load(PT + offs, mask=inb, other=0.0)
    tl.store(P + offs, w_old * p + (1.0 - w_old) * pt, mask=inb)


@triton.jit
def _stream_step(F, FT, G, GT, N, M, w_old, symmetric):
    """``_combine`` of F and of G (not for a symmetric problem, whose G aliases F), in one loop over both."""
    m = tl.where(symmetric, 0, M)
    for o in range(0, tl.maximum(N, m), VECTOR):
        offs = o + tl.arange(0, VECTOR)
        _combine(F, FT, offs, offs < N, w_old)
        _combine(G, GT, offs, offs < m, w_old)
    # the next pass reads F and G across the whole vector: order these stores before it (see _stream_update)
    tl.debug_barrier()


@triton.jit
def _streamed(ALPHA, BETA, F0, F1, F2, FP0, FP1, FP2, G, G_PREV, pid, p, N, M):
    """``(n, m, symmetric, A, Bw, Fp, FTp, Gp, GTp)``: pair pid's problem p as the streaming solvers read it:
    its lengths, its log-weights of the rows and the columns, its current potentials Fp, Gp and the updates'
    FTp, GTp (a symmetric problem's G aliases its F)."""
    rows_y, cols_y, n, m = _problem(p, N, M)
    symmetric = p > 0
    A, Bw = _weights(rows_y, ALPHA, BETA, pid, N, M), _weights(cols_y, ALPHA, BETA, pid, N, M)
    Fp, FTp = _pick(p, FP0, FP1, FP2) + pid * n, _pick(p, F0, F1, F2) + pid * n
    Gp, GTp = tl.where(symmetric, Fp, G_PREV + pid * m), tl.where(symmetric, FTp, G + pid * m)
    return n, m, symmetric, A, Bw, Fp, FTp, Gp, GTp


@triton.jit
def _stream_source(X, Y, MU, COST_HI, COST_LO, pid, p, N, M, FIRST, sxb, sxn, sxd, syb, sym, syd, smp, smb,
                   FROM_POINTS: tl.constexpr):
    """``(CH, CL, s_r, s_c, s_rd, s_cd, MUp)``: where pair pid's problem p streams its cost from
    (``_stream_update``): its packed cost (``_cost_base``; s_r = columns, s_c = 1), or FROM_POINTS its rows' and
    columns' points (row strides s_r, s_c, feature strides s_rd, s_cd) and their centre MUp (``_centred``)."""
    rows_y, cols_y, n, m = _problem(p, N, M)
    MUp = MU + p * smp + pid * smb
    if FROM_POINTS:
        CH, s_r, s_rd = _operand(rows_y, X, Y, pid, sxb, sxn, sxd, syb, sym, syd)
        CL, s_c, s_cd = _operand(cols_y, X, Y, pid, sxb, sxn, sxd, syb, sym, syd)
    else:
        base = _cost_offset(p, FIRST, N, M, pid)
        CH, CL, s_r, s_c, s_rd, s_cd = COST_HI + base, COST_LO + base, m, 1, 0, 0
    return CH, CL, s_r, s_c, s_rd, s_cd, MUp


@triton.jit
def _cost_offset(p, FIRST, N, M, pid):
    """Where pair pid's problem p starts in the packed costs (``_cost_base``)."""
    _, _, n, m = _problem(p, N, M)
    return _cost_base(p, FIRST, N, M) + pid * n * m


@triton.jit
def _sinkhorn_streaming_kernel(
        X, Y, MU, COST_HI, COST_LO, COST_ABS, ANCHORS, ALPHA, BETA, SCHED, F0, F1, F2, FP0, FP1, FP2, G, G_PREV, ITERS,
        ERR, N, M, D, FIRST, sxb, sxn, sxd, syb, sym, syd, smp, smb, smd, n_iters, tol, drift, BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_TOL: tl.constexpr, ABSORB: tl.constexpr,
        FROM_POINTS: tl.constexpr):
    """One pair and problem per program (grid and outputs as the resident kernel's), any length: the cost
    streams tile by tile, the potentials live in global memory.

    The cost: packed as ``_cost_kernel`` writes it (COST_HI, COST_LO), or, FROM_POINTS, formed again from the
    points X, Y (centres MU, as the resident kernel reads them) for every tile of every pass, with no
    [B, N, M] buffer at all (``_stream_tile``). FP_p, G_PREV hold the current potentials (zero on entry) and
    end as f_prev, g_prev; F_p, G are the updates' scratch and end as the final f, g. SCHED as in the
    resident kernel. ABSORB (packed only): COST_ABS (fp32, packed as the cost) holds the absorbed cost the
    fast passes read while their potentials stay within ``drift`` binary orders of its anchors
    (``_stream_softmin``); ANCHORS (fp32 [problems, B, 3, max(N, M)]) the anchors of the rows and of the
    columns and a pass's column weights. Both are scratch: no pass reads them before one stored them
    (``anchored``)."""
    pid = tl.program_id(0).to(tl.int64)
    p = FIRST + tl.program_id(1)
    n, m, symmetric, A, Bw, Fp, FTp, Gp, GTp = _streamed(ALPHA, BETA, F0, F1, F2, FP0, FP1, FP2, G, G_PREV, pid, p, N,
                                                         M)
    CH, CL, s_r, s_c, s_rd, s_cd, MUp = _stream_source(X, Y, MU, COST_HI, COST_LO, pid, p, N, M, FIRST, sxb, sxn, sxd,
                                                       syb, sym, syd, smp, smb, FROM_POINTS)
    CK = COST_ABS + _cost_offset(p, FIRST, N, M, pid)
    length = tl.maximum(N, M)
    AR = ANCHORS + (tl.program_id(1) * tl.num_programs(0) + pid) * 3 * length
    eps, inv_rho, n_anneal, eps_init = _schedule(SCHED)
    threshold = eps * PRECISE_RATIO

    t = n_iters * 0
    it = n_iters * 0
    go = n_iters >= 0
    anchored = n_iters < 0
    while go:  # the schedule, one step per trip (``_schedule_step``)
        e, precise, annealing, w_old, e_prev = _schedule_step(SCHED, t, n_anneal, eps_init, eps, threshold)
        _stream_update(CH, CL, CK, s_r, s_c, s_rd, s_cd, MUp, smd, D, n, m, A, Bw, Fp, Gp, FTp, GTp, AR, AR + length,
                       AR + 2 * length, 0, n, 0, m, e, precise, inv_rho, symmetric, t == 0, e_prev, anchored, drift,
                       ABSORB, FROM_POINTS, BLOCK_N, BLOCK_M, BLOCK_K)
        anchored = _stored(anchored, precise, e, e_prev)
        active = annealing | (it < n_iters)
        if HAS_TOL:
            active = active & (annealing | (_stream_error(Fp, FTp, Gp, GTp, A, Bw, n, m, eps) > tol))
        if active:
            _stream_step(Fp, FTp, Gp, GTp, n, m, w_old, symmetric)
        it += (active & ~annealing).to(tl.int32)
        t += 1
        go = active

    err = _stream_error(Fp, FTp, Gp, GTp, A, Bw, n, m, eps)
    out = tl.program_id(1) * tl.num_programs(0) + pid
    tl.store(ERR + out, err)
    tl.store(ITERS + out, n_anneal + it)


@triton.jit
def _chunk(length, parts, part, BLOCK: tl.constexpr):
    """``(begin, end)`` of part ``part`` of ``parts`` of 0..length, each a whole number of BLOCKs (the last
    ones may be short or empty)."""
    size = tl.cdiv(tl.cdiv(length, parts), BLOCK) * BLOCK
    begin = tl.minimum(part * size, length)
    return begin, tl.minimum(begin + size, length)


@triton.jit
def _split_update(CH, CL, s_r, s_c, s_rd, s_cd, MU, smd, D, n, m, A, Bw, Fp, Gp, FTp, GTp, r0, r1, c0, c1, PART, e,
                  precise, inv_rho, eps, symmetric, first, e_prev, FROM_POINTS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program's share of a step: ``_stream_update`` on its rows r0..r1 and columns c0..c1, and PART =
    their residual terms' sum (``_stream_error`` restricted to those rows and columns)."""
    _stream_update(CH, CL, CH, s_r, s_c, s_rd, s_cd, MU, smd, D, n, m, A, Bw, Fp, Gp, FTp, GTp, CH, CH, CH, r0, r1, c0,
                   c1, e, precise, inv_rho, symmetric, first, e_prev, False, 0.0, False, FROM_POINTS, BLOCK_N, BLOCK_M,
                   BLOCK_K)
    tl.store(PART, _stream_error(Fp + r0, FTp + r0, Gp + c0, GTp + c0, A + r0, Bw + c0, r1 - r0, c1 - c0, eps))


@triton.jit
def _split_keep(Fp, Gp, FTp, GTp, r0, r1, c0, c1, PARTS, n_split, t, n_anneal, w_old, n_iters, tol, symmetric,
                HAS_TOL: tl.constexpr):
    """``(active, err, it)`` of step t (``_schedule_step``), which every program of the problem decides alike:
    err = the step's residual, its programs' PARTS summed in a fixed order (the same bits in every program
    and run); it = the final-temperature updates kept before it (every earlier step was kept). When active,
    the program's rows and columns take the update (``_stream_step``)."""
    acc = tl.zeros((VECTOR,), dtype=tl.float64)
    for s0 in range(0, n_split, VECTOR):
        offs = s0 + tl.arange(0, VECTOR)
        acc += tl.load(PARTS + offs, mask=offs < n_split, other=0.0)
    err = tl.sum(acc, axis=0)
    annealing = t <= n_anneal
    it = tl.maximum(t - n_anneal - 1, 0)
    active = annealing | (it < n_iters)
    if HAS_TOL:
        active = active & (annealing | (err > tol))
    if active:
        _stream_step(Fp + r0, FTp + r0, Gp + c0, GTp + c0, r1 - r0, c1 - c0, w_old, symmetric)
    return active, err, it


@triton.jit
def _grid_sync(SYNC, n_split, k):
    """Every one of the n_split programs of a pair and problem has called this k times before any returns
    from its k-th call: a counter in global memory, release on arrival, acquire while waiting (the stores
    each program made before are then visible to all). Only for a grid whose programs all fit on the GPU at
    once (``triton_backend``'s split launcher sizes it so)."""
    tl.debug_barrier()
    tl.atomic_add(SYNC, 1, sem="release")
    while tl.atomic_add(SYNC, 0, sem="acquire") < k * n_split:
        pass
    tl.debug_barrier()


@triton.jit
def _sinkhorn_split_kernel(
        X, Y, MU, COST_HI, COST_LO, ALPHA, BETA, SCHED, F0, F1, F2, FP0, FP1, FP2, G, G_PREV, ITERS, ERR, PARTS,
        SYNC, N, M, D, FIRST, sxb, sxn, sxd, syb, sym, syd, smp, smb, smd, n_iters, tol, n_split, phase,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_TOL: tl.constexpr,
        PERSISTENT: tl.constexpr, FROM_POINTS: tl.constexpr):
    """The streaming solver (same buffers, cost from the packed tiles or from the points, and outputs; no
    absorbed cost) with each pair and problem's rows and columns split among n_split programs: grid (B,
    problems, n_split). Program r updates the rows and columns of its ``_chunk`` in each step; the step's
    residual is the sum of the programs' PARTS (float64 [problems, B, 2, n_split], by step parity), and each
    program decides alike whether to keep it.

    PERSISTENT: the whole schedule in one launch, two ``_grid_sync`` per step (SYNC: int32 [problems, B]
    counters, zero on entry), for grids that fit on the GPU at once. Otherwise the launch runs phase
    ``phase`` only: 2 t the update of step t, 2 t + 1 its decision, and the host launches phases until
    every SYNC flag (then: 1 = done) is set; that is the interpreter's way (its programs run one after
    the other, so a program waiting for another would wait forever)."""
    pid = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1)
    p = FIRST + q
    r = tl.program_id(2)
    n, m, symmetric, A, Bw, Fp, FTp, Gp, GTp = _streamed(ALPHA, BETA, F0, F1, F2, FP0, FP1, FP2, G, G_PREV, pid, p, N,
                                                         M)
    CH, CL, s_r, s_c, s_rd, s_cd, MUp = _stream_source(X, Y, MU, COST_HI, COST_LO, pid, p, N, M, FIRST, sxb, sxn, sxd,
                                                       syb, sym, syd, smp, smb, FROM_POINTS)
    r0, r1 = _chunk(n, n_split, r, BLOCK_N)
    c0, c1 = _chunk(m, n_split, r, BLOCK_M)
    # a symmetric problem's columns are its rows: its residual's column part must read this program's rows
    c0, c1 = tl.where(symmetric, r0, c0), tl.where(symmetric, r1, c1)
    eps, inv_rho, n_anneal, eps_init = _schedule(SCHED)
    threshold = eps * PRECISE_RATIO
    out = q * tl.num_programs(0) + pid
    PARTS = PARTS + out * 2 * n_split
    SYNC = SYNC + out

    if PERSISTENT:
        t = n_iters * 0
        k = n_iters * 0
        it = n_iters * 0
        err = eps * 0.0
        go = n_iters >= 0
        while go:
            e, precise, annealing, w_old, e_prev = _schedule_step(SCHED, t, n_anneal, eps_init, eps, threshold)
            slot = PARTS + (t % 2) * n_split
            _split_update(CH, CL, s_r, s_c, s_rd, s_cd, MUp, smd, D, n, m, A, Bw, Fp, Gp, FTp, GTp, r0, r1, c0, c1,
                          slot + r, e, precise, inv_rho, eps, symmetric, t == 0, e_prev, FROM_POINTS, BLOCK_N, BLOCK_M,
                          BLOCK_K)
            _grid_sync(SYNC, n_split, k + 1)
            active, err, it = _split_keep(Fp, Gp, FTp, GTp, r0, r1, c0, c1, slot, n_split, t, n_anneal, w_old,
                                          n_iters, tol, symmetric, HAS_TOL)
            _grid_sync(SYNC, n_split, k + 2)
            k += 2
            t += 1
            go = active
        if r == 0:
            tl.store(ITERS + out, n_anneal + it)
            tl.store(ERR + out, err)
    else:
        t = phase // 2
        if tl.load(SYNC) == 0:
            e, precise, annealing, w_old, e_prev = _schedule_step(SCHED, t, n_anneal, eps_init, eps, threshold)
            slot = PARTS + (t % 2) * n_split
            if phase % 2 == 0:
                _split_update(CH, CL, s_r, s_c, s_rd, s_cd, MUp, smd, D, n, m, A, Bw, Fp, Gp, FTp, GTp, r0, r1, c0,
                              c1, slot + r, e, precise, inv_rho, eps, symmetric, t == 0, e_prev, FROM_POINTS, BLOCK_N,
                              BLOCK_M, BLOCK_K)
            else:
                active, err, it = _split_keep(Fp, Gp, FTp, GTp, r0, r1, c0, c1, slot, n_split, t, n_anneal, w_old,
                                              n_iters, tol, symmetric, HAS_TOL)
                if (~active) & (r == 0):
                    tl.store(ITERS + out, n_anneal + it)
                    tl.store(ERR + out, err)
                    tl.store(SYNC, 1)


@triton.jit
def _grad_kernel(X, Y, MU, F_XY, G_XY, FP_XY, GP_XY, F_XX, FP_XX, F_YY, FP_YY, ALPHA, BETA, SCHED, U_X, U_Y, U_XX,
                 U_YY, OUT_X, OUT_Y, N, M, D, TERMS, n_groups, n_per_group, sxb, sxn, sxd, syb, sym, syd, smp, smb,
                 smd, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
                 PRECISION: tl.constexpr):
    """The loss's gradient with respect to the prepared points (``_centred``), one row block and one group of
    n_per_group output features (all of D when n_groups = 1) per program: side 0 writes OUT_X_i = u_i (x_i -
    sum_j S_ij y_j) of OT(x, y), minus, when TERMS = 2, the same term of OT(x, x) (weights U_XX); side 1
    writes OUT_Y alike with the roles of x and y exchanged (U_Y, and U_YY of OT(y, y)). The debiased loss's
    four gradient terms take one launch.

    S_ij = softmax_j(beta_j + (q_j - C_ij) / eps) for the term's problem, q its column potential before the
    final step (G_PREV), eps = SCHED[0]: exponents formed relative to the row potential f (= T(q), so near 0
    on the plan's support) as in the fast passes (``_plan_exponents``), normalised by each row's own sum.

    Each cost tile is formed over all of D (float64 DMMA) and its S multiplies every BLOCK_DO-wide slice of
    the group's y (``_accumulate``). The accumulator of the group's features does not fit in registers, so
    it is the program's own rows of OUT in global memory (L1/L2). The DMMA steps, the slices (ieee) and the
    output rows are software-pipelined (``STAGES``). Term 0 takes one pass over the column
    tiles, a running max and sum rescaling the accumulator (flash-attention's forward), and divides by the
    row sums at its end. Term 1 is added to term 0's finished output, which therefore cannot be rescaled:
    a first pass finds its rows' max and sum, a second adds (u / sum) S @ y (one more cost tile per tile,
    no scratch). Grid (B, row blocks, sides x n_groups); U_*, OUT_* (contiguous [B, rows, D]) are in the
    points' dtype, fp32 or float64; a padding row gets exactly 0."""
    pid = tl.program_id(0).to(tl.int64)
    side = tl.program_id(2) // n_groups
    d_lo = (tl.program_id(2) % n_groups) * n_per_group
    d_hi = tl.minimum(d_lo + n_per_group, D)
    rows_y = side == 1
    n = tl.where(rows_y, M, N)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < n
    Rp, srn, srd = _operand(rows_y, X, Y, pid, sxb, sxn, sxd, syb, sym, syd)
    valid_n = _valid(_weights(rows_y, ALPHA, BETA, pid, N, M), offs_n, in_n)
    live = tl.program_id(1) * BLOCK_N < n  # the row blocks span the longer side: a block past n does nothing
    OUTp = tl.where(rows_y, OUT_Y, OUT_X) + pid * n * D
    eps = tl.load(SCHED)
    k = ((1.0 / eps) * LOG2E).to(tl.float32)
    ones = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    for t in range(TERMS):
        term = side + 2 * t  # 0, 1: dx, dy of OT(x, y); 2: dx of OT(x, x); 3: dy of OT(y, y)
        cols_y = (side + t) % 2 == 0
        m = tl.where(cols_y, M, N)
        MUp = MU + tl.where(t == 0, 0, 1 + side) * smp + pid * smb
        Cp, scn, scd = _operand(cols_y, X, Y, pid, sxb, sxn, sxd, syb, sym, syd)
        Wc = _weights(cols_y, ALPHA, BETA, pid, N, M)
        Q = _pick4(term, GP_XY, FP_XY, FP_XX, FP_YY) + pid * m
        ph, _ = _split(tl.load(_pick4(term, F_XY, G_XY, F_XX, F_YY) + pid * n + offs_n, mask=in_n, other=0.0))
        m_run = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s_run = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(0, tl.where(live, m, 0), BLOCK_M):
            z, offs_m, valid_m = _plan_exponents(Rp, Cp, MUp, Wc, Q, ph, k, offs_n, valid_n, m0, m, D, srn, srd, scn,
                                                 scd, smd, BLOCK_N, BLOCK_M, BLOCK_K)
            m_new = tl.maximum(m_run, tl.max(z, axis=1))
            m_safe = _finite(m_new)
            scale = tl.exp2(m_run - m_safe)
            S = tl.exp2(z - m_safe[:, None])
            s_run = s_run * scale + tl.sum(S, axis=1)
            if t == 0:
                _accumulate(OUTp, S, scale, m0 > 0, Cp, MUp, offs_n, in_n, offs_m, valid_m, d_lo, d_hi, D, scn, scd,
                            smd, BLOCK_DO, PRECISION)
            m_run = m_new
        u = tl.load(_pick4(term, U_X, U_Y, U_XX, U_YY) + pid * n + offs_n, mask=in_n, other=0.0)
        s = tl.where(s_run > 0.0, s_run, 1.0)
        # term 0: OUT = u (x - OUT / s); term 1: OUT -= u x
        for d0 in tl.range(d_lo, d_hi, BLOCK_DO, num_stages=STAGES):
            offs_do = d0 + tl.arange(0, BLOCK_DO)
            in_do = offs_do < d_hi
            ok = in_n[:, None] & in_do[None, :]
            at = OUTp + offs_n[:, None] * D + offs_do[None, :]
            xt = _centred(Rp, MUp, offs_n, valid_n, offs_do, in_do, srn, srd, smd, 1).to(tl.float32)
            acc = tl.load(at, mask=ok, other=0.0)
            tl.store(at, tl.where(t == 0, u[:, None] * (xt - acc / s[:, None]), acc - u[:, None] * xt), mask=ok)
        tl.debug_barrier()  # what follows reads and writes what other threads of the program wrote here
        if t > 0:  # term 1's second pass: OUT += (u / s) S @ y
            m_fin = _finite(m_run)
            w = (u / s).to(tl.float32)
            for m0 in range(0, tl.where(live, m, 0), BLOCK_M):
                z, offs_m, valid_m = _plan_exponents(Rp, Cp, MUp, Wc, Q, ph, k, offs_n, valid_n, m0, m, D, srn, srd,
                                                     scn, scd, smd, BLOCK_N, BLOCK_M, BLOCK_K)
                _accumulate(OUTp, tl.exp2(z - m_fin[:, None]) * w[:, None], ones, True, Cp, MUp, offs_n, in_n, offs_m,
                            valid_m, d_lo, d_hi, D, scn, scd, smd, BLOCK_DO, PRECISION)


@triton.jit
def _plan_exponents(Rp, Cp, MUp, Wc, Q, ph, k, offs_n, valid_n, m0, m, D, srn, srd, scn, scd, smd,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(z, offs_m, valid_m)``: the backward's base-2 plan exponents of the column tile at m0 (``_fast_exponents``
    relative to the row potential ph, the cost tile formed from the points; -inf on padding rows and
    columns), its column offsets and which of them are tokens."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    in_m = offs_m < m
    beta = tl.load(Wc + offs_m, mask=in_m, other=float("-inf"))
    valid_m = beta > float("-inf")
    C_hi, C_lo = _cost_tile_dot(Rp, Cp, MUp, offs_n, offs_m, valid_n, valid_m, D, srn, srd, scn, scd, smd, BLOCK_N,
                                BLOCK_M, BLOCK_K, STAGES)
    qh, ql = _split(tl.load(Q + offs_m, mask=in_m, other=0.0))
    z = _fast_exponents(C_hi, C_lo, ph[:, None], qh[None, :], ((beta * LOG2E).to(tl.float32) + ql * k)[None, :], k)
    return tl.where(valid_n[:, None], z, float("-inf")), offs_m, valid_m


@triton.jit
def _accumulate(ACC, S, scale, keep, Cp, MUp, offs_n, in_n, offs_m, valid_m, d_lo, d_hi, D, scn, scd, smd,
                BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr):
    """ACC <- ACC scale + S @ y (keep: whether ACC holds earlier tiles' sums; else it starts here) over the
    features d_lo..d_hi of the rows offs_n of ACC (contiguous [rows, D]), BLOCK_DO at a time."""
    # pipelined with the ieee dot only: tf32x3's three products spilled 16-36 B under triton 3.6 and 3.7 with it
    for d0 in tl.range(d_lo, d_hi, BLOCK_DO, num_stages=STAGES if PRECISION == "ieee" else 1):
        offs_do = d0 + tl.arange(0, BLOCK_DO)
        in_do = offs_do < d_hi
        ok = in_n[:, None] & in_do[None, :]
        at = ACC + offs_n[:, None] * D + offs_do[None, :]
        prev = tl.load(at, mask=ok & keep, other=0.0).to(tl.float32) * scale[:, None]
        yt = _centred(Cp, MUp, offs_m, valid_m, offs_do, in_do, scn, scd, smd, 1).to(tl.float32)
        tl.store(at, tl.dot(S, yt, prev, input_precision=PRECISION), mask=ok)
    # the next tile's slices are read by threads other than those that stored them (the dot's layout)
    tl.debug_barrier()
