// Fused log-domain Sinkhorn for CPU tensors: every iteration of a batch of OT problems in one call.
//
// Math: the loop of otfast/schedule.py (the one written specification: the soft-min T, its transpose, the
// dampening d, init, annealing list, per-pair tol stop, final extrapolation step, residual, masking), with
// the semantics of otfast/reference.py, to which this file is a faster twin.
//
// Points. The point entries take the raw embeddings and do reference.prepare_points themselves, into a
// per-team copy that stays in cache: padding rows (log-weight -inf) become 0 whatever they hold, then
// the pair is centred on the mean of its valid rows (sqeuclidean) or every row is normalised (cosine,
// 1 - cos = |x/|x| - y/|y||^2 / 2). One read of x and y, no [B, N, D] temporaries, and the backward
// maps the gradient back through the normalisation, (g - p <p, g>) / |x|, in the same pass.
//
// Layout and memory traffic. The cost tile C = |x_i - y_j|^2 / 2 of a pair (expanded as
// |x|^2/2 + |y|^2/2 - <x, y> on the prepared points, clamped at 0, like reference.sqeuclidean_cost) is
// formed once from x [N, D] and y [M, D] (2 N M D flops, 4x2 register blocks of dot products; measured at
// B = 32, N = M = 40, D = 768 on one core: about 1.1 ms, against 1.9 ms for torch's MKL bmm + norms in
// reference.sqeuclidean_cost, which would also write [B, N, M] to memory), then kept as
// two scaled copies K = C / eps [N, M] and K^T [M, N] (16 N M bytes, 26 KB at N = M = 40: they
// stay in L1/L2 for every iteration). Each soft-min reduces over the leading axis of one copy with SIMD
// lanes across its trailing axis, the output index, so that every lane accumulates its own sum in a
// fixed order: no horizontal reduction, results independent of the thread count. Per pair and
// iteration: 2 N M exponentials, 2 N M subtract/max, N + M logarithms; nothing but the tile and the
// [N], [M] vectors is touched. exp and log are branch-free polynomials (about 1 ulp) on 32-byte vectors
// (GCC vector extensions), cloned for AVX-512, AVX2 and baseline x86-64 and picked at load time. 32 bytes,
// not 64: on AVX2, 64-byte generic vectors are split into register pairs and the 4 x 2 dot blocks spill
// (measured on an AMD EPYC with AVX2: the cost tile 5x slower than with 32-byte vectors). glibc's vector
// math would need -ffast-math, which breaks the -inf of the masks: never used.
//
// Kernel domain. At the final temperature the same update runs without the N M exponentials where it
// can (Schmitzer's absorption, as in POT's sinkhorn_stabilized): with the row pass's kernel
// E_ji = exp(beta_j + (f^_i + g^_j - C_ij)/eps) formed at the current potentials f^, g^ (exponent in
// double precision, weight in the exponent as in the log domain), T(g)_i = d f^_i - d eps log sum_j
// E_ji exp((g_j - g^_j)/eps): N M multiply-adds and N + M exponentials and logarithms per pass (the
// column pass likewise). The sums are of positive terms, as accurate as the log-domain ones while they
// stay in [floor, 1/floor] and the exponents within +-theta (ExpRange); a pass outside that is redone
// in the log domain and the kernel is formed again, and a pair whose freshly formed kernels fail twice
// (C / eps far beyond the float range) stays in the log domain. Annealing (one update per temperature)
// and the final extrapolation step always run in the log domain. Measured at B = 32, N = M = 40, cosine,
// eps 0.05 on 2 threads: 100 iterations take 1.2 ms instead of 2.1 ms.
//
// Backward (envelope theorem through the final step, see reference.grad_points): recompute the tile, then
// each plan row S^x_i = softmax_j(beta_j + (g_prev_j - C_ij) / eps), normalised by its own log-sum-exp (a
// max pass, then the exponentials and their sum: never exp(... + f_i / (d eps)), whose rows sum to 1 only
// in exact arithmetic), and dx_i = u_i (x_i - sum_j S^x_ij y_j); likewise dy_j from the columns with f_prev.
// 4-row blocks share each loaded y_j; every sum runs in j order. Memory: the tile and two [N, M] plan tiles
// per pair, never [B, N, M].
//
// Threads: OpenMP over pairs (dynamic schedule); when the batch is smaller than the thread count and the
// pairs are large (kSplitMin), one pair at a time with its rows and columns split across the threads
// (two barriers per iteration, two more for the team's kernel-domain verdicts). Every reduction has a
// fixed order and every kernel-domain choice depends on the pair's data only, so results are bitwise
// identical whatever the number of threads.
//
// Precision: double throughout, whatever the input dtype (the launcher converts float32 inputs and rounds
// the gradients back once; the potentials come out in double). At the paper's settings C / eps reaches 1e5
// and fp32 is not enough in three places (measured with python -m benchmarks.accuracy, see the README's
// Numerics): the cost tile (the rounding of an fp32 dot product over D = 768 moves the plan by percents),
// the potentials (one fp32 rounding of a potential of the cost's size is a 1% change in the plan), and the
// log-sum-exps at the large temperatures of the annealing (an error of eps 2^-24 that later steps carry
// down to the final eps). Dot products use 4 interleaved partial sums per lane and a fixed tree.

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#define OTK_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)  // ifunc
#define OTK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OTK_CLONES
#endif

namespace otk {

// ----------------------------------------------------------------------------------------------
// 32-byte vectors of doubles and the elementary functions on them (no tables, no branches, no calls).
// ----------------------------------------------------------------------------------------------

template <class T>
struct Simd;
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  static constexpr int L = 4;
};

constexpr int kPad = 16;  // padding unit of every tile row and vector (a multiple of the lane count)

inline int padded(int n) { return (n + kPad - 1) / kPad * kPad; }

template <class T>
constexpr T inf() {
  return std::numeric_limits<T>::infinity();
}

template <class V, class T>
OTK_INLINE V splat(T s) {
  return V{} + s;
}

template <class T>
OTK_INLINE typename Simd<T>::V load(const T* p) {
  typename Simd<T>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class T>
OTK_INLINE void store(T* p, typename Simd<T>::V v) {
  std::memcpy(p, &v, sizeof(v));
}

// Horner form of sum_{k=2}^{n} r^(k-2) / k!, so that exp(r) = 1 + r + r^2 p(r) to degree n (1/k! is
// correctly rounded: k! <= 15! is an exact double).
template <int n, class V, class T = std::remove_reference_t<decltype(V{}[0])>>
OTK_INLINE V taylor_tail(V r) {
  auto inv_factorial = [](int k) {
    double f = 1.0;
    for (int i = 2; i <= k; ++i) f *= i;
    return static_cast<T>(T(1) / static_cast<T>(f));
  };
  V p = splat<V>(inv_factorial(n));
  for (int k = n - 1; k >= 2; --k) p = p * r + inv_factorial(k);
  return p;
}

// exp on [lo, hi] (callers clamp): Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, then 2^k p(r).
OTK_INLINE Simd<double>::V exp_core(Simd<double>::V xc) {
  using V = Simd<double>::V;
  using I = Simd<double>::I;
  const V magic = splat<V>(6755399441055744.0);  // 1.5 * 2^52
  V t = xc * 1.4426950408889634 + magic;
  V k = t - magic;
  V r = xc - k * 6.93147180369123816490e-01;
  r = r - k * 1.90821492927058770002e-10;
  // Taylor series to degree 13 on |r| <= ln(2)/2: truncation below 2^-56.
  V p = taylor_tail<13>(r);
  p = p * r * r + r + 1.0;
  I ki = (I)t - (I)magic;
  return p * (V)((ki + 1023) << 52);
}

// Bounds of exp_core: exp(lo) is the smallest normal number, exp(hi) stays finite.
template <class T>
struct ExpRange;
//
// The kernel-domain iterations (kernel_pass) accept a sum of E_ij v_j over M terms in [floor, 1 / floor]
// with every exponent of v within +-theta (v in [e^-theta, e^theta], normal). Then the largest term is
// >= floor / M, and the terms that can change the sum in double precision (within 2^-53 of it) are normal
// numbers, and so are the E_ij they come from: for M <= 2^13, E_ij >= 2^(-400-13-53) e^-200 ~ 2^-755. The
// weights live in the exponent of E (as in the log domain), never as separate factors that could
// underflow. Terms below the normal range are therefore negligible, and flushing them to zero
// (FlushDenormals) changes no accepted sum.
template <>
struct ExpRange<double> {
  static constexpr double lo = -708.3964185322641, hi = 709.0, floor = 0x1p-400, theta = 200.0;
};

// exp(x): 0 below lo (and for -inf), +inf above hi.
template <class V, class T = std::remove_reference_t<decltype(V{}[0])>>
OTK_INLINE V vexp(V x) {
  const V lo = splat<V>(ExpRange<T>::lo), hi = splat<V>(ExpRange<T>::hi);
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  V y = exp_core(xc);
  y = x < lo ? V{} : y;
  return x > hi ? splat<V>(inf<T>()) : y;
}

// exp(x) for the terms of a log-sum-exp, x <= 0 and finite: below lo it returns exp(lo) (~2e-308) instead
// of 0, which cannot change a sum that is >= 1.
template <class V, class T = std::remove_reference_t<decltype(V{}[0])>>
OTK_INLINE V vexp_lse(V x) {
  const V lo = splat<V>(ExpRange<T>::lo);
  return exp_core(x > lo ? x : lo);  // one max instruction
}

// log(s) for positive normal s (the LSE sums are >= 1); -inf for s <= 0.
OTK_INLINE Simd<double>::V vlog(Simd<double>::V s) {
  using V = Simd<double>::V;
  using I = Simd<double>::I;
  I b = (I)s;
  // exponent as a double without an int64 -> double conversion: (2^52 + e_biased) - (2^52 + 1023)
  V e = (V)(((b >> 52) & 0x7ff) | 0x4330000000000000LL) - 4503599627371519.0;
  V m = (V)((b & 0xfffffffffffffLL) | 0x3ff0000000000000LL);  // [1, 2)
  auto big = m > splat<V>(1.4142135623730951);
  m = big ? m * 0.5 : m;
  e = big ? e + 1.0 : e;
  // log(m) = 2 atanh(q), q = (m - 1) / (m + 1), |q| <= 0.1716: series to q^23.
  V q = (m - 1.0) / (m + 1.0), q2 = q * q;
  V p = splat<V>(1.0 / 23.0);
  p = p * q2 + 1.0 / 21.0;
  p = p * q2 + 1.0 / 19.0;
  p = p * q2 + 1.0 / 17.0;
  p = p * q2 + 1.0 / 15.0;
  p = p * q2 + 1.0 / 13.0;
  p = p * q2 + 1.0 / 11.0;
  p = p * q2 + 1.0 / 9.0;
  p = p * q2 + 1.0 / 7.0;
  p = p * q2 + 1.0 / 5.0;
  p = p * q2 + 1.0 / 3.0;
  V lm = 2.0 * q + 2.0 * q * q2 * p;
  V out = e * 6.93147180369123816490e-01 + (lm + e * 1.90821492927058770002e-10);
  return s > V{} ? out : splat<V>(-inf<double>());
}

// |exp(t) - 1|, accurate for small |t| (the residual of a nearly converged pair): a Taylor series below
// ln(2)/2 (degree 15: truncation below half an ulp), exp(t) - 1 above.
template <class V, class T = std::remove_reference_t<decltype(V{}[0])>>
OTK_INLINE V vabs_expm1(V t) {
  V p = taylor_tail<15>(t);
  V small = t + t * t * p;
  V at = t < V{} ? -t : t;
  V out = at < splat<V>(T(0.34657359027997264)) ? small : vexp(t) - T(1);
  return out < V{} ? -out : out;
}

// A 64-byte aligned, zero-initialised buffer.
template <class T>
struct Buffer {
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<T[], Free> ptr;
  size_t size = 0;

  Buffer() = default;
  explicit Buffer(size_t n) : ptr(static_cast<T*>(::operator new[](std::max<size_t>(n, 1) * sizeof(T),
                                                                      std::align_val_t(64)))),
                              size(n) {
    std::fill(ptr.get(), ptr.get() + n, T(0));
  }
  Buffer(const Buffer& o) : Buffer(o.size) {}
  T* data() const { return ptr.get(); }
  T& operator[](size_t i) const { return ptr[i]; }
};

// ----------------------------------------------------------------------------------------------
// Teams: the threads that share one pair (one thread when parallelism is over pairs).
// ----------------------------------------------------------------------------------------------

struct Team {
  int tid = 0, nth = 1;

  void sync() const {
#ifdef _OPENMP
    if (nth > 1) {
#pragma omp barrier
    }
#endif
  }

  // This thread's contiguous share [lo, hi) of [0, n); the split never changes a value.
  void range(int n, int& lo, int& hi) const {
    int q = n / nth, r = n % nth;
    lo = tid * q + std::min(tid, r);
    hi = lo + q + (tid < r ? 1 : 0);
  }

  // The share of [0, n) in whole blocks of kPad: [lo, hi) with lo, hi multiples of kPad (hi <= padded(n)).
  void blocks(int n, int& lo, int& hi) const {
    range(padded(n) / kPad, lo, hi);
    lo *= kPad;
    hi *= kPad;
  }
};

// Pairs smaller than this (N M) are not split across threads: two barriers per iteration cost more than
// the work (measured: N = M = 40 breaks even, 128 gains 1.5x on 2 threads).
constexpr int64_t kSplitMin = 64 * 64;

// Runs body(b, team, work) for every pair b; `work` is owned by the team that solves the pair: `proto` for
// the first (or only) team, a copy of it for each other one. The copies are made before the threads start, so
// that running out of memory is a std::bad_alloc the binding turns into MemoryError, not one thrown inside an
// OpenMP region (std::terminate). Threads go over pairs, or, when there are fewer pairs than threads and the
// pairs are large, into one team per pair.
template <class Work, class Body>
void for_each_pair(int B, int threads, int64_t pair_size, Work& proto, Body body) {
#ifdef _OPENMP
  if (threads > 1 && B < threads && pair_size >= kSplitMin) {
    for (int b = 0; b < B; ++b) {
#pragma omp parallel num_threads(threads)
      {
        Team team{omp_get_thread_num(), omp_get_num_threads()};
        body(b, team, proto);
      }
    }
    return;
  }
  const int teams = std::min(threads, B);
  if (teams > 1) {
    std::vector<Work> copies(teams - 1, proto);
#pragma omp parallel num_threads(teams)
    {
      const int t = omp_get_thread_num();
      Work& own = t == 0 ? proto : copies[t - 1];
#pragma omp for schedule(dynamic, 1)
      for (int b = 0; b < B; ++b) body(b, Team{}, own);
    }
    return;
  }
#endif
  for (int b = 0; b < B; ++b) body(b, Team{}, proto);
}

// ----------------------------------------------------------------------------------------------
// Cost tile.
// ----------------------------------------------------------------------------------------------

// Fixed-order horizontal sum: lane l += lane l + w for w = L/2, ..., 1 (a tree), done on halves of the
// vector (upper half added to the lower one) so that it costs a few shuffles instead of L scalar adds.
template <class T, int W>
OTK_INLINE T hsum_halves(const T* lanes) {
  if constexpr (W == 1) {
    return lanes[0];
  } else {
    typedef T Half __attribute__((vector_size(W / 2 * sizeof(T))));
    Half lo, hi;
    std::memcpy(&lo, lanes, sizeof(Half));
    std::memcpy(&hi, lanes + W / 2, sizeof(Half));
    lo += hi;
    T next[W / 2];
    std::memcpy(next, &lo, sizeof(Half));
    return hsum_halves<T, W / 2>(next);
  }
}

template <class T>
OTK_INLINE T hsum(typename Simd<T>::V v) {
  T t[Simd<T>::L];
  std::memcpy(t, &v, sizeof(v));
  return hsum_halves<T, Simd<T>::L>(t);
}

// out[i][j] = <a_i, b_j> for a 4 x 2 block: L interleaved partial sums, a fixed tree, then the tail.
// Every entry is summed in the same order, so <a, b> does not depend on its position in a block.
template <class T>
OTK_INLINE void dot_block(const T* const a[4], const T* const b[2], int D, T out[4][2]) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  V c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{};
  int d = 0;
  for (; d + L <= D; d += L) {
    V b0 = load(b[0] + d), b1 = load(b[1] + d);
    V a0 = load(a[0] + d), a1 = load(a[1] + d), a2 = load(a[2] + d), a3 = load(a[3] + d);
    c00 += a0 * b0;
    c01 += a0 * b1;
    c10 += a1 * b0;
    c11 += a1 * b1;
    c20 += a2 * b0;
    c21 += a2 * b1;
    c30 += a3 * b0;
    c31 += a3 * b1;
  }
  const V c[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 2; ++j) {
      T tail = T(0);
      for (int e = d; e < D; ++e) tail += a[i][e] * b[j][e];
      out[i][j] = hsum<T>(c[i][j]) + tail;
    }
}

// Rows [i0, i1) of C [N, ldc]: C_ij = max(xx_i + yy_j - <x_i, y_j>, 0) for j < M, 0 for M <= j < ldc.
template <class T>
OTK_CLONES void cost_rows(const T* x, const T* y, const T* xx, const T* yy, int M, int D, int ldc, int i0, int i1,
                          T* C) {
  for (int i = i0; i < i1; i += 4) {
    const T* a[4];
    for (int k = 0; k < 4; ++k) a[k] = x + (int64_t)std::min(i + k, i1 - 1) * D;
    for (int j = 0; j < M; j += 2) {
      const T* b[2] = {y + (int64_t)j * D, y + (int64_t)std::min(j + 1, M - 1) * D};
      T dots[4][2];
      dot_block(a, b, D, dots);
      for (int k = 0; k < 4 && i + k < i1; ++k)
        for (int m = 0; m < 2 && j + m < M; ++m)
          C[(int64_t)(i + k) * ldc + j + m] = std::max(xx[i + k] + yy[j + m] - dots[k][m], T(0));
    }
    for (int k = 0; k < 4 && i + k < i1; ++k) std::fill(C + (int64_t)(i + k) * ldc + M, C + (int64_t)(i + k + 1) * ldc, T(0));
  }
}

// <a, b> over D entries, summed in dot_block's order (so C_ii = 0 exactly when y = x).
template <class T>
OTK_INLINE T dot_row(const T* a, const T* b, int D) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  V c{};
  int d = 0;
  for (; d + L <= D; d += L) c += load(a + d) * load(b + d);
  T tail = T(0);
  for (int e = d; e < D; ++e) tail += a[e] * b[e];
  return hsum<T>(c) + tail;
}

// |v_r|^2 / 2 for rows [lo, hi) of v [n, D].
template <class T>
OTK_CLONES void half_sq_norms(const T* v, int D, int lo, int hi, T* out) {
  for (int r = lo; r < hi; ++r) out[r] = dot_row(v + (int64_t)r * D, v + (int64_t)r * D, D) / T(2);
}

// Rows [lo, hi) of out [n, D] from v [n, D] (otfast.reference.prepare_points): 0 on padding rows (logw
// == -inf, whatever they hold); else v_r - mean (mean != nullptr) or v_r / max(|v_r|, 1e-12), with
// that inverse norm kept in rinv[r] for the backward.
template <class T>
OTK_CLONES void prepare_rows(const T* v, const T* logw, const T* mean, int D, int lo, int hi, T* out, T* rinv) {
  for (int r = lo; r < hi; ++r) {
    const T* a = v + (int64_t)r * D;
    T* o = out + (int64_t)r * D;
    if (logw[r] == -inf<T>()) {
      std::fill(o, o + D, T(0));
      rinv[r] = T(0);
    } else if (mean) {
      for (int d = 0; d < D; ++d) o[d] = a[d] - mean[d];
      rinv[r] = T(1);
    } else {
      const T inv = T(1) / std::max(std::sqrt(dot_row(a, a, D)), T(1e-12));
      for (int d = 0; d < D; ++d) o[d] = a[d] * inv;
      rinv[r] = inv;
    }
  }
}

// Columns [d0, d1) of mean [D]: the mean of the valid rows of x [N, D] and y [M, D], rows summed in order.
template <class T>
OTK_CLONES void valid_mean(const T* x, const T* ax, int N, const T* y, const T* ay, int M, int D, int d0, int d1,
                           T* mean) {
  std::fill(mean + d0, mean + d1, T(0));
  int count = 0;
  for (int pass = 0; pass < 2; ++pass) {
    const T* v = pass ? y : x;
    const T* logw = pass ? ay : ax;
    for (int r = 0; r < (pass ? M : N); ++r) {
      if (logw[r] == -inf<T>()) continue;
      const T* a = v + (int64_t)r * D;
      for (int d = d0; d < d1; ++d) mean[d] += a[d];
      ++count;
    }
  }
  for (int d = d0; d < d1; ++d) mean[d] /= T(count);
}

// A pair's prepared points, shared by its team: x [N, D], y [M, D] (y aliases x for a symmetric
// problem on one point set) and the inverse norms rx [N], ry [M] (1 when centred, 0 on padding).
template <class T>
struct PreparedPoints {
  Buffer<T> x, y, rx, ry, mean;

  PreparedPoints(int N, int M, int D) : x((size_t)N * D), y((size_t)M * D), rx(N), ry(M), mean(D) {}

  // Prepares the pair; `same` when y_in, ay are x_in, ax (OT(x, x) of the debiased loss): y is x then.
  void build(const T* x_in, const T* ax, int N, const T* y_in, const T* ay, int M, int D, bool cosine, bool same,
             const Team& team) {
    int lo, hi;
    if (!cosine) {
      team.range(D, lo, hi);
      valid_mean(x_in, ax, N, y_in, ay, same ? 0 : M, D, lo, hi, mean.data());
      team.sync();
    }
    const T* m = cosine ? nullptr : mean.data();
    team.range(N, lo, hi);
    prepare_rows(x_in, ax, m, D, lo, hi, x.data(), rx.data());
    if (!same) {
      team.range(M, lo, hi);
      prepare_rows(y_in, ay, m, D, lo, hi, y.data(), ry.data());
    }
    team.sync();
  }

  const T* ys(bool same) const { return same ? x.data() : y.data(); }
};

// Rows [lo, hi) of g [n, D], the gradient with respect to prepared rows p = v / |v|, turned into the one
// with respect to v: (g_r - p_r <p_r, g_r>) rinv_r (otfast.reference.prepare_grad); 0 on padding rows.
template <class T>
OTK_CLONES void normalise_grad_rows(const T* p, const T* rinv, int D, int lo, int hi, T* g) {
  for (int r = lo; r < hi; ++r) {
    const T* pr = p + (int64_t)r * D;
    T* gr = g + (int64_t)r * D;
    const T dot = dot_row(pr, gr, D);
    for (int d = 0; d < D; ++d) gr[d] = (gr[d] - pr[d] * dot) * rinv[r];
  }
}

// The cost tile of one pair, shared by its team: C [N, padded(M)] (0 in the padding columns).
template <class T>
struct CostTile {
  Buffer<T> C, xx, yy;

  CostTile(int N, int M) : C((size_t)N * padded(M)), xx(N), yy(M) {}

  const T* build(const T* x, const T* y, int N, int M, int D, const Team& team) {
    int lo, hi;
    team.range(N, lo, hi);
    half_sq_norms(x, D, lo, hi, xx.data());
    team.range(M, lo, hi);
    half_sq_norms(y, D, lo, hi, yy.data());
    team.sync();
    team.range(N, lo, hi);
    cost_rows(x, y, xx.data(), yy.data(), M, D, padded(M), lo, hi, C.data());
    team.sync();
    return C.data();
  }
};

// Rows [r0, r1) of out [R, ldo] = (A / div)^T, A [Q, lda] (Q columns of out); 0 in out's padding columns.
template <class T>
OTK_CLONES void transpose_scaled(const T* A, int lda, int Q, T div, int r0, int r1, T* out, int ldo) {
  for (int r = r0; r < r1; ++r) {
    T* o = out + (int64_t)r * ldo;
    for (int q = 0; q < Q; ++q) o[q] = A[(int64_t)q * lda + r] / div;
    std::fill(o + Q, o + ldo, T(0));
  }
}

// Rows [r0, r1) of out [R, ldo] = A / div, A [R, lda] with Q used columns; 0 in out's padding columns.
template <class T>
OTK_CLONES void copy_scaled(const T* A, int lda, int Q, T div, int r0, int r1, T* out, int ldo) {
  for (int r = r0; r < r1; ++r) {
    const T* a = A + (int64_t)r * lda;
    T* o = out + (int64_t)r * ldo;
    for (int q = 0; q < Q; ++q) o[q] = a[q] / div;
    std::fill(o + Q, o + ldo, T(0));
  }
}

// ----------------------------------------------------------------------------------------------
// Forward.
// ----------------------------------------------------------------------------------------------

struct Plan {
  std::vector<double> anneal;
  double eps = 1.0;
  int64_t n_iters = 0;
  std::optional<double> tol, rho;

  double damping(double e) const { return rho ? 1.0 / (1.0 + e / *rho) : 1.0; }
};

// out[q] = coef * LSE_r(h_r - A[r, q]) for q in [q0, q1) (multiples of kPad), 0 where logw[q] == -inf.
// Lanes run across q; each lane reduces over r in increasing order. Rows with h_r == -inf are skipped
// (exactly what exp(-inf) = 0 would add). A row of A holds at least q1 entries.
template <class T>
OTK_CLONES void softmin_pass(const T* A, int R, int lda, const T* h, int q0, int q1, T coef, const T* logw,
                             T* out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  const V ninf = splat<V>(-inf<T>());
  for (int q = q0; q < q1; q += L) {
    V m0 = ninf, m1 = ninf;  // max is exact: two chains for latency, any order gives the same value
    int r = 0;
    for (; r + 2 <= R; r += 2) {
      V z0 = h[r] - load(A + (int64_t)r * lda + q);
      V z1 = h[r + 1] - load(A + (int64_t)(r + 1) * lda + q);
      z0 = h[r] == -inf<T>() ? ninf : z0;
      z1 = h[r + 1] == -inf<T>() ? ninf : z1;
      m0 = m0 > z0 ? m0 : z0;
      m1 = m1 > z1 ? m1 : z1;
    }
    if (r < R && h[r] != -inf<T>()) {
      V z0 = h[r] - load(A + (int64_t)r * lda + q);
      m0 = m0 > z0 ? m0 : z0;
    }
    V m = m0 > m1 ? m0 : m1;
    m = m == ninf ? V{} : m;  // an all -inf column: sum 0, log -inf, never NaN
    V s{};
    for (r = 0; r < R; ++r) {
      if (h[r] == -inf<T>()) continue;
      s += vexp_lse((h[r] - load(A + (int64_t)r * lda + q)) - m);
    }
    V o = coef * (vlog(s) + m);
    store(out + q, load(logw + q) == ninf ? V{} : o);
  }
}

// out[i] = w_i |exp((old_i - new_i) / eps) - 1| (0 where logw == -inf) for i in [lo, hi), multiples of kPad.
template <class T>
OTK_CLONES void residual_terms(const T* old_, const T* new_, const T* w, const T* logw, T eps, int lo, int hi,
                               T* out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  for (int i = lo; i < hi; i += L) {
    V term = load(w + i) * vabs_expm1((load(old_ + i) - load(new_ + i)) / eps);
    store(out + i, load(logw + i) == splat<V>(-inf<T>()) ? V{} : term);
  }
}

template <class T>
T ordered_sum(const T* v, int n) {
  T s = T(0);
  for (int i = 0; i < n; ++i) s += v[i];
  return s;
}

// Rows [r0, r1) of E [R, lde] = exp(logw_r + (pr_r + pc_c - cost(r, c)) / eps), with cost(r, c) = C[r, c],
// or C[c, r] when `transposed` (C [*, ldc]); 0 where a row or column weight is 0 (logw == -inf, the
// padding columns c >= Q included). r is the index the soft-min sums over, so its weight sits in the
// exponent, as in the log domain.
template <class T>
OTK_CLONES void kernel_rows(const T* C, int ldc, bool transposed, int Q, const T* pr, const T* logw_r, const T* pc,
                            const T* logw_c, double eps, int r0, int r1, T* E, int lde) {
  using VD = typename Simd<double>::V;
  constexpr int LD = Simd<double>::L;
  std::vector<double> arg(lde, -inf<double>());  // exponents of one row; -inf (exp 0) on masked columns
  const double inv_eps = 1.0 / eps;
  for (int r = r0; r < r1; ++r) {
    T* e = E + (int64_t)r * lde;
    if (logw_r[r] == -inf<T>()) {
      std::fill(e, e + lde, T(0));
      continue;
    }
    const double wr = logw_r[r], fr = pr[r];
    const int64_t step = transposed ? ldc : 1;
    const T* cost = transposed ? C + r : C + (int64_t)r * ldc;
    for (int c = 0; c < Q; ++c)
      arg[c] = logw_c[c] == -inf<T>() ? -inf<double>()
                                       : wr + ((fr + double(pc[c])) - double(cost[c * step])) * inv_eps;
    for (int c = 0; c < lde; c += LD) {
      VD z;
      std::memcpy(&z, arg.data() + c, sizeof(z));
      const VD out = vexp(z);
      for (int l = 0; l < LD; ++l) e[c + l] = static_cast<T>(out[l]);
    }
  }
}

// The smallest and the largest lane of a vector.
template <class T>
T lane_min(typename Simd<T>::V v) {
  T t[Simd<T>::L];
  std::memcpy(t, &v, sizeof(v));
  return *std::min_element(t, t + Simd<T>::L);
}

template <class T>
T lane_max(typename Simd<T>::V v) {
  T t[Simd<T>::L];
  std::memcpy(t, &v, sizeof(v));
  return *std::max_element(t, t + Simd<T>::L);
}

// v[c] = exp((p_c - p_hat_c) / eps) over a padded vector, 0 where logw[c] == -inf (padding). False when an
// exponent of a valid entry leaves [-theta, theta] (the kernel of p_hat no longer fits p).
template <class T>
OTK_CLONES bool kernel_scaling(const T* p, const T* p_hat, const T* logw, T eps, int n, T* v) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  const V ninf = splat<V>(-inf<T>());
  V zmax{};  // max |z| over the valid entries, lane-wise
  for (int c = 0; c < n; c += L) {
    const V z = (load(p + c) - load(p_hat + c)) / eps;
    const auto masked = load(logw + c) == ninf;
    V az = z < V{} ? -z : z;
    az = masked ? V{} : az;
    zmax = zmax > az ? zmax : az;
    store(v + c, masked ? V{} : vexp(z));
  }
  return lane_max<T>(zmax) <= ExpRange<T>::theta;
}

// out[q] = coef * (log(sum_r E[r, q] v_r) - p_hat_q / eps) for q in [q0, q1) (multiples of kPad), 0 where
// logw[q] == -inf: the soft-min of softmin_pass with the exponentials of the tile replaced by the kernel E
// of the potentials p_hat it was formed at (Schmitzer's absorption), so one multiply-add per entry
// instead of an exponential. Each lane sums over r in a fixed order (four interleaved chains). E is 0
// on the rows where v is 0 (masked), so the products there are 0. False when a valid lane's sum
// leaves [floor, 1 / floor] (see ExpRange): the caller then redoes the lanes in the log domain.
template <class T>
OTK_CLONES bool kernel_pass(const T* E, int R, int lde, const T* v, const T* p_hat, int q0, int q1, T coef,
                            T eps, const T* logw, T* out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  const V ninf = splat<V>(-inf<T>());
  V smin = splat<V>(inf<T>()), smax{};  // over the valid lanes; a NaN sum fails both comparisons below
  for (int q = q0; q < q1; q += L) {
    V s0{}, s1{}, s2{}, s3{};  // four chains (rows r mod 4) hide the multiply-add latency
    int r = 0;
    for (; r + 4 <= R; r += 4) {
      const T* e = E + (int64_t)r * lde + q;
      s0 += load(e) * v[r];
      s1 += load(e + lde) * v[r + 1];
      s2 += load(e + 2 * (int64_t)lde) * v[r + 2];
      s3 += load(e + 3 * (int64_t)lde) * v[r + 3];
    }
    for (; r < R; ++r) s0 += load(E + (int64_t)r * lde + q) * v[r];
    const V s = (s0 + s1) + (s2 + s3);
    const V lw = load(logw + q);
    const V s_valid = s == s ? s : V{};  // NaN -> 0, which fails the floor
    smin = lw == ninf ? smin : (smin < s_valid ? smin : s_valid);
    smax = lw == ninf ? smax : (smax > s ? smax : s);
    store(out + q, lw == ninf ? V{} : coef * (vlog(s) - load(p_hat + q) / eps));
  }
  return lane_min<T>(smin) >= ExpRange<T>::floor && lane_max<T>(smax) <= T(1) / ExpRange<T>::floor;
}

// Denormal numbers flushed to zero (FTZ and DAZ) while alive, on this thread. The kernel-domain sums
// may form products below the normal range, which cannot change a sum kernel_pass accepts (see
// ExpRange) but would each cost a microcode assist.
struct FlushDenormals {
#if defined(__SSE2__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// Team-wide OR of a per-thread flag: every thread gets the same answer. `round` (0 or 1) must flip
// identically on every thread; the two slots let the next round start before everyone has read this one.
struct TeamFlags {
  int size;
  std::vector<char> slots;

  // threads: the call's thread count, which no team exceeds (for_each_pair).
  explicit TeamFlags(int threads) : size(std::max(threads, 1)), slots(2 * (size_t)size, 0) {}

  bool any(bool mine, int& round, const Team& team) {
    if (team.nth == 1) return mine;
    char* slot = slots.data() + (size_t)round * size;
    round ^= 1;
    slot[team.tid] = mine;
    team.sync();
    bool out = false;
    for (int t = 0; t < team.nth; ++t) out = out || slot[t];
    return out;
  }
};

// Per-team state of one solve: scaled tiles and potentials, padded to kPad (pads hold 0).
template <class T>
struct ForwardWork {
  PreparedPoints<T> pts;
  CostTile<T> tile;
  Buffer<T> K, Kt, E, Et, f, g, ft, gt, rf, rg, f_hat, g_hat;
  TeamFlags failed;

  // K and E serve the column pass only: none for symmetric problems.
  ForwardWork(int N, int M, int D, bool points, bool symmetric, int threads)
      : pts(points ? N : 0, points ? M : 0, points ? D : 0), tile(points ? N : 0, points ? M : 0),
        K((size_t)(symmetric ? 0 : N) * padded(M)), Kt((size_t)M * padded(N)),
        E((size_t)(symmetric ? 0 : N) * padded(M)), Et((size_t)M * padded(N)), f(padded(N)), g(padded(M)),
        ft(padded(N)), gt(padded(M)), rf(padded(N)), rg(padded(M)), f_hat(padded(N)), g_hat(padded(M)),
        failed(threads) {}
};

// Per-thread copies of a pair's weights, padded with -inf (log-weights) and 0 (weights).
template <class T>
struct Weights {
  std::vector<T> logw, w;

  Weights(const T* lw, int n) : logw(padded(n), -inf<T>()), w(padded(n), T(0)) {
    for (int i = 0; i < n; ++i) {
      logw[i] = lw[i];
      w[i] = std::exp(lw[i]);
    }
  }
};

// Solves one pair with its team. C [N, ldc]: the cost (finite where both weights are > 0).
template <class T>
void solve_pair(const T* C, int ldc, const T* alpha_in, const T* beta_in, int N, int M, const Plan& plan,
                bool symmetric, ForwardWork<T>& w, const Team& team, T* f_out, T* g_out, T* fp_out, T* gp_out,
                int32_t* it_out, T* err_out) {
  const int Np = padded(N), Mp = padded(M);
  int ilo, ihi, jlo, jhi, rlo, rhi, clo, chi;
  team.blocks(N, ilo, ihi);  // share of f (output lanes of the row pass)
  team.blocks(M, jlo, jhi);  // share of g
  team.range(N, rlo, rhi);   // share of K's rows
  team.range(M, clo, chi);   // share of K^T's rows
  const Weights<T> a(alpha_in, N), b(beta_in, M);
  std::vector<T> h(std::max(Np, Mp));
  const FlushDenormals flush;

  // K = C / eps [N, Mp] (column pass) and K^T [M, Np] (row pass); symmetric problems need only K^T.
  // eps_k is per thread: every thread follows the same schedule, so all of them meet the barrier.
  double eps_k = -1.0;
  auto set_eps = [&](double e) {
    if (e == eps_k) return;
    const T et = static_cast<T>(e);
    if (!symmetric) copy_scaled(C, ldc, M, et, rlo, rhi, w.K.data(), Mp);
    transpose_scaled(C, ldc, N, et, clo, chi, w.Kt.data(), Np);
    team.sync();
    eps_k = e;
  };
  // ft = T(g) and gt = T~(f) on this thread's share, in the log domain (gt = ft when symmetric).
  auto row_pass = [&](const T* g, double e, T* ft) {
    const T et = static_cast<T>(e);
    for (int j = 0; j < M; ++j) h[j] = b.logw[j] + g[j] / et;
    softmin_pass(w.Kt.data(), M, Np, h.data(), ilo, ihi, static_cast<T>(-plan.damping(e) * e), a.logw.data(), ft);
  };
  auto column_pass = [&](const T* f, double e, T* gt) {
    const T et = static_cast<T>(e);
    for (int i = 0; i < N; ++i) h[i] = a.logw[i] + f[i] / et;
    softmin_pass(w.K.data(), N, Mp, h.data(), jlo, jhi, static_cast<T>(-plan.damping(e) * e), b.logw.data(), gt);
  };
  auto update = [&](const T* f, const T* g, double e, T* ft, T* gt) {
    row_pass(g, e, ft);
    if (symmetric)
      std::copy(ft + ilo, ft + ihi, gt + ilo);
    else
      column_pass(f, e, gt);
  };

  // The same update at the final temperature through the kernels E = exp(logw + (f_hat + g_hat - C) / eps)
  // (kernel_pass): formed at the current potentials, kept while the sums stay in range, formed again
  // when they leave it, and given up for the rest of the solve once freshly formed kernels have failed
  // kFreshFailures times (the log domain is then the only accurate way; the first potentials, one
  // update away from zero, can be too far off for a kernel that later ones fit). Every choice is the
  // team's and depends on the pair's data only. E [N, Mp] serves the column pass, Et [M, Np] the row
  // pass (only Et when symmetric).
  constexpr int kFreshFailures = 2;
  bool kernel_formed = false, fresh = false;
  int fresh_failures = 0, round = 0;
  auto form_kernel = [&](const T* f, const T* g) {
    std::copy(f + ilo, f + ihi, w.f_hat.data() + ilo);
    std::copy(g + jlo, g + jhi, w.g_hat.data() + jlo);
    team.sync();
    if (!symmetric)
      kernel_rows(C, ldc, false, M, w.f_hat.data(), a.logw.data(), w.g_hat.data(), b.logw.data(), plan.eps, rlo, rhi,
                  w.E.data(), Mp);
    kernel_rows(C, ldc, true, N, w.g_hat.data(), b.logw.data(), w.f_hat.data(), a.logw.data(), plan.eps, clo, chi,
                w.Et.data(), Np);
    team.sync();
  };
  auto kernel_update = [&](const T* f, const T* g, T* ft, T* gt) {
    if (fresh_failures == kFreshFailures) return update(f, g, plan.eps, ft, gt);
    if (!kernel_formed) {
      form_kernel(f, g);
      kernel_formed = fresh = true;
    }
    const T et = static_cast<T>(plan.eps), coef = static_cast<T>(-plan.damping(plan.eps) * plan.eps);
    bool ok = kernel_scaling(g, w.g_hat.data(), b.logw.data(), et, Mp, h.data()) &&
              kernel_pass(w.Et.data(), M, Np, h.data(), w.f_hat.data(), ilo, ihi, coef, et, a.logw.data(), ft);
    const bool row_failed = w.failed.any(!ok, round, team);
    if (row_failed) row_pass(g, plan.eps, ft);
    bool column_failed = false;
    if (symmetric) {
      std::copy(ft + ilo, ft + ihi, gt + ilo);
    } else {
      ok = kernel_scaling(f, w.f_hat.data(), a.logw.data(), et, Np, h.data()) &&
           kernel_pass(w.E.data(), N, Mp, h.data(), w.g_hat.data(), jlo, jhi, coef, et, b.logw.data(), gt);
      column_failed = w.failed.any(!ok, round, team);
      if (column_failed) column_pass(f, plan.eps, gt);
    }
    if (row_failed || column_failed) {
      fresh_failures += fresh;
      kernel_formed = false;
    }
    fresh = false;
  };
  auto residuals = [&]() {
    const T et = static_cast<T>(plan.eps);
    residual_terms(w.f.data(), w.ft.data(), a.w.data(), a.logw.data(), et, ilo, ihi, w.rf.data());
    residual_terms(w.g.data(), w.gt.data(), b.w.data(), b.logw.data(), et, jlo, jhi, w.rg.data());
  };
  auto average = [&]() {
    for (int i = ilo; i < ihi; ++i) w.f[i] = (w.f[i] + w.ft[i]) / T(2);
    for (int j = jlo; j < jhi; ++j) w.g[j] = (w.g[j] + w.gt[j]) / T(2);
  };

  const double eps0 = plan.anneal.empty() ? plan.eps : plan.anneal.front();
  set_eps(eps0);
  std::fill(w.ft.data() + ilo, w.ft.data() + ihi, T(0));
  std::fill(w.gt.data() + jlo, w.gt.data() + jhi, T(0));
  team.sync();
  update(w.ft.data(), w.gt.data(), eps0, w.f.data(), w.g.data());
  team.sync();
  for (double e : plan.anneal) {
    set_eps(e);
    update(w.f.data(), w.g.data(), e, w.ft.data(), w.gt.data());
    team.sync();
    average();
    team.sync();
  }

  set_eps(plan.eps);
  const T tol = plan.tol ? static_cast<T>(*plan.tol) : T(0);
  int32_t n_done = static_cast<int32_t>(plan.anneal.size());
  for (int64_t it = 0; it < plan.n_iters; ++it) {
    kernel_update(w.f.data(), w.g.data(), w.ft.data(), w.gt.data());
    if (plan.tol) residuals();
    team.sync();
    if (plan.tol) {
      T err = ordered_sum(w.rf.data(), N) + ordered_sum(w.rg.data(), M);
      if (!(err > tol)) {  // every thread sees the same err: the whole team stops
        team.sync();         // before anyone overwrites rf, rg
        break;
      }
    }
    average();
    ++n_done;
    team.sync();
  }

  update(w.f.data(), w.g.data(), plan.eps, w.ft.data(), w.gt.data());
  residuals();
  team.sync();
  for (int i = ilo; i < std::min(ihi, N); ++i) {
    f_out[i] = w.ft[i];
    fp_out[i] = w.f[i];
  }
  for (int j = jlo; j < std::min(jhi, M); ++j) {
    g_out[j] = w.gt[j];
    gp_out[j] = w.g[j];
  }
  if (team.tid == 0) {
    *it_out = n_done;
    *err_out = ordered_sum(w.rf.data(), N) + ordered_sum(w.rg.data(), M);
  }
}

// ----------------------------------------------------------------------------------------------
// Backward.
// ----------------------------------------------------------------------------------------------

// Rows [lo, hi) of S [R, lds]: S[r, c] = softmax_c(logw_c + (prev_c - A[r, c]) / eps), each row normalised
// by its own sum (the max of its exponents first, so no term overflows); 0 on rows with logw_r == -inf.
// logw_c, prev_c padded to lds (logw_c = -inf there), A [R, lds].
template <class T>
OTK_CLONES void plan_rows(const T* A, int lds, const T* logw_c, const T* prev_c, const T* logw_r, T eps, int lo,
                          int hi, T* S) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  const V ninf = splat<V>(-inf<T>());
  for (int r = lo; r < hi; ++r) {
    T* s = S + (int64_t)r * lds;
    if (logw_r[r] == -inf<T>()) {
      std::fill(s, s + lds, T(0));
      continue;
    }
    const T* ar = A + (int64_t)r * lds;
    V m = ninf;
    for (int c = 0; c < lds; c += L) {
      const V z = load(logw_c + c) + (load(prev_c + c) - load(ar + c)) / eps;
      store(s + c, z);
      m = m > z ? m : z;
    }
    const V mx = splat<V>(lane_max<T>(m));
    V sum{};
    for (int c = 0; c < lds; c += L) {
      const V e = vexp(load(s + c) - mx);
      store(s + c, e);
      sum += e;
    }
    const V inv = splat<V>(T(1) / hsum<T>(sum));
    for (int c = 0; c < lds; c += L) store(s + c, load(s + c) * inv);
  }
}

// out[r] = scale_r (p_r - sum_{c < Q} S[r, c] q_c) for rows [lo, hi); S [R, lds], q [Q, D], p and out [R, D].
// 4-row blocks share each loaded q_c; the sum over c runs in increasing order for every entry.
template <class T>
OTK_CLONES void plan_times_points(const T* S, int lds, int Q, const T* q, const T* p, const T* scale, int D, int lo,
                                  int hi, T* out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  for (int r = lo; r < hi; r += 4) {
    int rows[4];
    for (int k = 0; k < 4; ++k) rows[k] = std::min(r + k, hi - 1);  // a short block repeats its last row
    const T* s[4] = {S + (int64_t)rows[0] * lds, S + (int64_t)rows[1] * lds, S + (int64_t)rows[2] * lds,
                     S + (int64_t)rows[3] * lds};
    auto finish = [&](int k, int d, V acc) {
      const int64_t o = (int64_t)rows[k] * D + d;
      store(out + o, scale[rows[k]] * (load(p + o) - acc));
    };
    int d = 0;
    for (; d + 2 * L <= D; d += 2 * L) {
      V a00{}, a01{}, a10{}, a11{}, a20{}, a21{}, a30{}, a31{};
      for (int c = 0; c < Q; ++c) {
        const T* qc = q + (int64_t)c * D + d;
        V q0 = load(qc), q1 = load(qc + L);
        a00 += s[0][c] * q0;
        a01 += s[0][c] * q1;
        a10 += s[1][c] * q0;
        a11 += s[1][c] * q1;
        a20 += s[2][c] * q0;
        a21 += s[2][c] * q1;
        a30 += s[3][c] * q0;
        a31 += s[3][c] * q1;
      }
      finish(0, d, a00), finish(0, d + L, a01), finish(1, d, a10), finish(1, d + L, a11);
      finish(2, d, a20), finish(2, d + L, a21), finish(3, d, a30), finish(3, d + L, a31);
    }
    for (; d + L <= D; d += L) {
      V a0{}, a1{}, a2{}, a3{};
      for (int c = 0; c < Q; ++c) {
        V qv = load(q + (int64_t)c * D + d);
        a0 += s[0][c] * qv;
        a1 += s[1][c] * qv;
        a2 += s[2][c] * qv;
        a3 += s[3][c] * qv;
      }
      finish(0, d, a0), finish(1, d, a1), finish(2, d, a2), finish(3, d, a3);
    }
    for (; d < D; ++d)
      for (int k = 0; k < 4; ++k) {
        T acc = T(0);
        for (int c = 0; c < Q; ++c) acc += s[k][c] * q[(int64_t)c * D + d];
        out[(int64_t)rows[k] * D + d] = scale[rows[k]] * (p[(int64_t)rows[k] * D + d] - acc);
      }
  }
}

// Per-team state of one backward: the cost tile, its transpose and the two plan tiles.
template <class T>
struct BackwardWork {
  PreparedPoints<T> pts;
  CostTile<T> tile;
  Buffer<T> Ct, Sx, Sy;

  BackwardWork(int N, int M, int D)
      : pts(N, M, D), tile(N, M), Ct((size_t)M * padded(N)), Sx((size_t)N * padded(M)), Sy((size_t)M * padded(N)) {}
};

// A pair's vector padded to kPad with `pad`.
template <class T>
std::vector<T> padded_copy(const T* v, int n, T pad) {
  std::vector<T> out(padded(n), pad);
  std::copy(v, v + n, out.begin());
  return out;
}

// ----------------------------------------------------------------------------------------------
// Python bindings: numpy buffers in, numpy buffers out; the GIL is released while computing.
// ----------------------------------------------------------------------------------------------

namespace py = pybind11;

template <class T>
using Arr = py::array_t<T, py::array::c_style>;

template <class T>
const T* data_of(const py::array& a, const char* name, std::vector<py::ssize_t> shape) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw std::invalid_argument(std::string(name) + " must be a " + std::string(py::str(py::dtype::of<T>())) +
                                " array (the launcher converts the inputs)");
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + " must be C-contiguous");
  if (a.ndim() != (py::ssize_t)shape.size())
    throw std::invalid_argument(std::string(name) + " has the wrong number of dimensions");
  for (size_t k = 0; k < shape.size(); ++k)
    if (a.shape(k) != shape[k]) throw std::invalid_argument(std::string(name) + " has the wrong shape");
  return static_cast<const T*>(a.data());
}

Plan make_plan(const std::vector<double>& anneal, double eps, int64_t n_iters, std::optional<double> tol,
               std::optional<double> rho) {
  if (!(eps > 0)) throw std::invalid_argument("eps must be > 0");
  if (n_iters < 0) throw std::invalid_argument("n_iters must be >= 0");
  for (double e : anneal)
    if (!(e > 0)) throw std::invalid_argument("annealing temperatures must be > 0");
  if (rho && !(*rho > 0)) throw std::invalid_argument("rho must be > 0");
  return Plan{anneal, eps, n_iters, tol, rho};
}

template <class T>
py::tuple solve_impl(const py::array* C_in, const py::array* x_in, const py::array* y_in, const py::array& alpha_in,
                     const py::array& beta_in, const Plan& plan, bool symmetric, bool cosine, int threads) {
  if (alpha_in.ndim() != 2 || beta_in.ndim() != 2) throw std::invalid_argument("alpha, beta must be [B, N], [B, M]");
  const int B = (int)alpha_in.shape(0), N = (int)alpha_in.shape(1), M = (int)beta_in.shape(1);
  const T* alpha = data_of<T>(alpha_in, "alpha", {B, N});
  const T* beta = data_of<T>(beta_in, "beta", {B, M});
  if (symmetric && N != M) throw std::invalid_argument("a symmetric problem needs N == M");
  const T *C = nullptr, *x = nullptr, *y = nullptr;
  int D = 0;
  if (C_in) {
    C = data_of<T>(*C_in, "C", {B, N, M});
  } else {
    if (x_in->ndim() != 3) throw std::invalid_argument("x must be [B, N, D]");
    D = (int)x_in->shape(2);
    x = data_of<T>(*x_in, "x", {B, N, D});
    y = data_of<T>(*y_in, "y", {B, M, D});
  }
  Arr<T> f({B, N}), g({B, M}), fp({B, N}), gp({B, M}), err({B});
  py::array_t<int32_t> its({B});
  T *fo = f.mutable_data(), *go = g.mutable_data(), *fpo = fp.mutable_data(), *gpo = gp.mutable_data();
  T* erro = err.mutable_data();
  int32_t* ito = its.mutable_data();
  {
    py::gil_scoped_release release;
    const bool same = x == y && alpha == beta && N == M;
    ForwardWork<T> proto(N, M, D, C == nullptr, symmetric, threads);
    for_each_pair(B, threads, (int64_t)N * M, proto, [&](int b, const Team& team, ForwardWork<T>& w) {
      const T* Cb = C ? C + (int64_t)b * N * M : nullptr;
      if (!C) {
        w.pts.build(x + (int64_t)b * N * D, alpha + (int64_t)b * N, N, y + (int64_t)b * M * D, beta + (int64_t)b * M,
                    M, D, cosine, same, team);
        Cb = w.tile.build(w.pts.x.data(), w.pts.ys(same), N, M, D, team);
      }
      solve_pair(Cb, C ? M : padded(M), alpha + (int64_t)b * N, beta + (int64_t)b * M, N, M, plan, symmetric, w,
                 team, fo + (int64_t)b * N, go + (int64_t)b * M, fpo + (int64_t)b * N, gpo + (int64_t)b * M,
                 ito + b, erro + b);
      team.sync();  // the team's work is reused by the next pair
    });
  }
  return py::make_tuple(f, g, fp, gp, its, err);
}

template <class T>
T* out_of(const py::array& a, const char* name, std::vector<py::ssize_t> shape) {
  if (!a.writeable()) throw std::invalid_argument(std::string(name) + " must be writeable");
  return const_cast<T*>(data_of<T>(a, name, shape));
}

template <class T>
void grad_impl(const py::array& x_in, const py::array& y_in, const py::array& alpha_in, const py::array& beta_in,
               const py::array& fp_in, const py::array& gp_in, double eps, const py::array& u_in,
               const std::optional<py::array>& v_in, bool cosine, const py::array& dx_out,
               const std::optional<py::array>& dy_out, int threads) {
  if (x_in.ndim() != 3 || y_in.ndim() != 3) throw std::invalid_argument("x, y must be [B, N, D], [B, M, D]");
  const int B = (int)x_in.shape(0), N = (int)x_in.shape(1), M = (int)y_in.shape(1), D = (int)x_in.shape(2);
  const T* x = data_of<T>(x_in, "x", {B, N, D});
  const T* y = data_of<T>(y_in, "y", {B, M, D});
  const T* alpha = data_of<T>(alpha_in, "alpha", {B, N});
  const T* beta = data_of<T>(beta_in, "beta", {B, M});
  const T* fp = data_of<T>(fp_in, "f_prev", {B, N});
  const T* gp = data_of<T>(gp_in, "g_prev", {B, M});
  const T* u = data_of<T>(u_in, "u", {B, N});
  const T* v = v_in ? data_of<T>(*v_in, "v", {B, M}) : nullptr;
  if (!(eps > 0)) throw std::invalid_argument("eps must be > 0");
  if (v_in.has_value() != dy_out.has_value()) throw std::invalid_argument("v and dy are given together or not at all");
  T* dxo = out_of<T>(dx_out, "dx", {B, N, D});
  T* dyo = v ? out_of<T>(*dy_out, "dy", {B, M, D}) : nullptr;
  {
    py::gil_scoped_release release;
    const T et = static_cast<T>(eps);
    const int Np = padded(N), Mp = padded(M);
    const bool same = x == y && alpha == beta && N == M;
    BackwardWork<T> proto(N, M, D);
    for_each_pair(B, threads, (int64_t)N * M, proto, [&](int b, const Team& team, BackwardWork<T>& w) {
      const T *ab = alpha + (int64_t)b * N, *bb = beta + (int64_t)b * M;
      w.pts.build(x + (int64_t)b * N * D, ab, N, y + (int64_t)b * M * D, bb, M, D, cosine, same, team);
      const T *xb = w.pts.x.data(), *yb = w.pts.ys(same);
      const T* C = w.tile.build(xb, yb, N, M, D, team);
      T* dxb = dxo + (int64_t)b * N * D;
      int lo, hi;
      team.range(N, lo, hi);
      const std::vector<T> beta_p = padded_copy(bb, M, -inf<T>()), gp_p = padded_copy(gp + (int64_t)b * M, M, T(0));
      plan_rows(C, Mp, beta_p.data(), gp_p.data(), ab, et, lo, hi, w.Sx.data());
      plan_times_points(w.Sx.data(), Mp, M, yb, xb, u + (int64_t)b * N, D, lo, hi, dxb);
      if (cosine) normalise_grad_rows(xb, w.pts.rx.data(), D, lo, hi, dxb);
      if (v) {
        T* dyb = dyo + (int64_t)b * M * D;
        team.range(M, lo, hi);
        transpose_scaled(C, Mp, N, T(1), lo, hi, w.Ct.data(), Np);
        const std::vector<T> alpha_p = padded_copy(ab, N, -inf<T>()), fp_p = padded_copy(fp + (int64_t)b * N, N, T(0));
        plan_rows(w.Ct.data(), Np, alpha_p.data(), fp_p.data(), bb, et, lo, hi, w.Sy.data());
        plan_times_points(w.Sy.data(), Np, N, xb, yb, v + (int64_t)b * M, D, lo, hi, dyb);
        if (cosine) normalise_grad_rows(yb, same ? w.pts.rx.data() : w.pts.ry.data(), D, lo, hi, dyb);
      }
      team.sync();  // the team's tile is reused by the next pair
    });
  }
}

// The sides of the batch's bounding box, the annealing diameter's (schedule.bounding_diameter): per feature,
// the largest minus the least coordinate over every valid row of x and y (masks, not weights), in their
// dtype, a NaN among the valid coordinates winning as in torch's amax/amin. One read of x and y and no
// temporaries, where the reference's masked amax/amin write four [B, N, D] copies; OpenMP over 64-feature
// blocks, each taking the rows in order.
template <class T>
py::array_t<T> bounding_sides_impl(const py::array& x_in, const py::array& y_in, const py::array& mx_in,
                                   const py::array& my_in, int threads) {
  if (x_in.ndim() != 3 || y_in.ndim() != 3) throw std::invalid_argument("x, y must be [B, N, D], [B, M, D]");
  const py::ssize_t B = x_in.shape(0), N = x_in.shape(1), M = y_in.shape(1), D = x_in.shape(2);
  const T* x = data_of<T>(x_in, "x", {B, N, D});
  const T* y = data_of<T>(y_in, "y", {B, M, D});
  const bool* mx = data_of<bool>(mx_in, "mask_x", {B, N});
  const bool* my = data_of<bool>(my_in, "mask_y", {B, M});
  py::array_t<T> out(std::vector<py::ssize_t>{D});
  T* sides = out.mutable_data();
  {
    py::gil_scoped_release release;
    constexpr py::ssize_t kBlock = 64;
    const py::ssize_t blocks = (D + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(std::max(threads, 1)) schedule(static) if (threads > 1 && blocks > 1)
    for (py::ssize_t k = 0; k < blocks; ++k) {
      const py::ssize_t d0 = k * kBlock, width = std::min(D - d0, kBlock);
      T hi[kBlock], lo[kBlock], nan[kBlock];  // nan: 0, or NaN once a NaN was seen (then the side is NaN)
      std::fill(hi, hi + width, -inf<T>());
      std::fill(lo, lo + width, inf<T>());
      std::fill(nan, nan + width, T(0));
      for (const auto& [p, mask, rows] : {std::make_tuple(x, mx, B * N), std::make_tuple(y, my, B * M)})
        for (py::ssize_t r = 0; r < rows; ++r) {
          if (!mask[r]) continue;
          const T* row = p + r * D + d0;
          for (py::ssize_t j = 0; j < width; ++j) {  // branch-free, so that it vectorises
            const T v = row[j];
            hi[j] = v > hi[j] ? v : hi[j];
            lo[j] = v < lo[j] ? v : lo[j];
            nan[j] = v != v ? v : nan[j];
          }
        }
      for (py::ssize_t j = 0; j < width; ++j) sides[d0 + j] = (hi[j] - lo[j]) + nan[j];
    }
  }
  return out;
}

}  // namespace otk

PYBIND11_MODULE(_sinkhorn, m) {
  namespace py = pybind11;
  using namespace otk;
  m.doc() = "Fused log-domain Sinkhorn on CPU (see otfast/cpu_backend.py for the Python-facing API).";
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.def(
      "solve_cost",
      [](const py::array& C, const py::array& alpha, const py::array& beta, const std::vector<double>& anneal,
         double eps, int64_t n_iters, std::optional<double> tol, std::optional<double> rho, bool symmetric,
         int threads) {
        Plan plan = make_plan(anneal, eps, n_iters, tol, rho);
        return solve_impl<double>(&C, nullptr, nullptr, alpha, beta, plan, symmetric, false, threads);
      },
      py::arg("C"), py::arg("alpha"), py::arg("beta"), py::arg("anneal"), py::arg("eps"), py::arg("n_iters"),
      py::arg("tol"), py::arg("rho"), py::arg("symmetric"), py::arg("threads"),
      "Sinkhorn on costs C [B, N, M]; returns (f, g, f_prev, g_prev, n_iters, error) as numpy arrays.");
  m.def(
      "solve_points",
      [](const py::array& x, const py::array& y, const py::array& alpha, const py::array& beta,
         const std::vector<double>& anneal, double eps, int64_t n_iters, std::optional<double> tol,
         std::optional<double> rho, bool symmetric, bool cosine, int threads) {
        Plan plan = make_plan(anneal, eps, n_iters, tol, rho);
        return solve_impl<double>(nullptr, &x, &y, alpha, beta, plan, symmetric, cosine, threads);
      },
      py::arg("x"), py::arg("y"), py::arg("alpha"), py::arg("beta"), py::arg("anneal"), py::arg("eps"),
      py::arg("n_iters"), py::arg("tol"), py::arg("rho"), py::arg("symmetric"), py::arg("cosine"), py::arg("threads"),
      "Sinkhorn between the raw points x [B, N, D], y [B, M, D] (padding rows ignored; centred for the sqeuclidean "
      "cost, normalised for the cosine one); returns as solve_cost.");
  m.def(
      "grad_points",
      [](const py::array& x, const py::array& y, const py::array& alpha, const py::array& beta,
         const py::array& f_prev, const py::array& g_prev, double eps, const py::array& u,
         const std::optional<py::array>& v, bool cosine, const py::array& dx, const std::optional<py::array>& dy,
         int threads) { grad_impl<double>(x, y, alpha, beta, f_prev, g_prev, eps, u, v, cosine, dx, dy, threads); },
      py::arg("x"), py::arg("y"), py::arg("alpha"), py::arg("beta"), py::arg("f_prev"), py::arg("g_prev"),
      py::arg("eps"), py::arg("u"), py::arg("v"), py::arg("cosine"), py::arg("dx"), py::arg("dy"), py::arg("threads"),
      "Writes the envelope gradients with respect to the raw points through the final step into dx [B, N, D] and "
      "dy [B, M, D] (given with v), 0 on padding rows. The caller allocates them (see otfast/cpu_backend.py, grad_points).");
  m.def(
      "bounding_sides",
      [](const py::array& x, const py::array& y, const py::array& mask_x, const py::array& mask_y, int threads) {
        if (py::isinstance<py::array_t<float>>(x))
          return py::array(bounding_sides_impl<float>(x, y, mask_x, mask_y, threads));
        return py::array(bounding_sides_impl<double>(x, y, mask_x, mask_y, threads));
      },
      py::arg("x"), py::arg("y"), py::arg("mask_x"), py::arg("mask_y"), py::arg("threads"),
      "The sides [D] of the bounding box of the valid points (bool masks [B, N], [B, M]) of x [B, N, D] and y "
      "[B, M, D], both float32 or both float64, in their dtype: hi - lo per feature (see otfast/cpu_backend.py).");
}
