// Fused log-domain Sinkhorn for CPU tensors: every iteration of a batch of OT problems in one call.
//
// Semantics are those of otfast/reference.py and otfast/schedule.py, to which this file is a faster
// twin (same init, annealing list, per-pair tol stop, final extrapolation step, residual, masking).
// Per pair, with cost C [N, M], log-weights alpha [N], beta [M] (-inf on padding), temperature eps and
// dampening d (1 when balanced):
//
//     row soft-min     T(g)_i  = -d eps LSE_j( beta_j  + g_j / eps - C_ij / eps )
//     column soft-min  T~(f)_j = -d eps LSE_i( alpha_i + f_i / eps - C_ij / eps )
//
// Layout and memory traffic. One pair at a time per thread: the cost tile C = |x_i - y_j|^2 / 2
// (expanded as |x|^2/2 + |y|^2/2 - <x, y> on centred points, clamped at 0) is formed once from x [N, D]
// and y [M, D] (2 N M D flops), then kept as two scaled copies K = C / eps [N, M] and K^T [M, N]
// (8 N M bytes in fp32: 13 KB at N = M = 40, resident in L1/L2 for every iteration). Each soft-min
// reduces over the leading axis of one copy and runs SIMD lanes across its trailing axis, the output
// index, so that every lane accumulates its own sum in a fixed order: no horizontal reduction, results
// independent of the vector width and of the thread count. Per pair and iteration: 2 N M exponentials,
// 2 N M max/sub, N + M logarithms; nothing is read from or written to memory beyond the tile and the
// [N] and [M] vectors. exp and log are branch-free polynomial versions (Cephes-style, about 1 ulp)
// that the compiler vectorises; glibc's vector math is only used under -ffast-math, which would break
// the -inf of the masks, so it is never used.
//
// Backward (envelope theorem through the final step, see reference.grad_points): recompute the tile,
// S^x_ij = exp(beta_j + (g_prev_j - C_ij)/eps + f_i/(d eps)) row by row, dx_i = u_i (x_i - sum_j S^x_ij y_j);
// likewise dy_j = v_j (y_j - sum_i S^y_ji x_i). Row blocks of 4 share each loaded y_j, the sum runs in
// j order. No [B, N, M] tensor is written.
//
// Threads: OpenMP over pairs (dynamic schedule); when the batch is smaller than the thread count,
// one pair at a time with its rows and columns split across the threads. Every reduction has a fixed
// order, so results are bitwise identical whatever the number of threads.
//
// Accumulation: in the input precision (fp32 for fp32 inputs, fp64 for fp64). The LSE sums add M
// terms in [0, 1] to a total >= 1, so their relative error is at most M * 2^-24 in fp32 (typically
// sqrt(M) * 2^-24), below the float32 reference's own rounding of C / eps.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__)
#define OTK_INLINE inline __attribute__((always_inline))
#else
#define OTK_INLINE inline
#endif

namespace otk {

// ----------------------------------------------------------------------------------------------
// Vectorisable elementary functions (no table lookups, no branches, no calls).
// ----------------------------------------------------------------------------------------------

template <class To, class From>
OTK_INLINE To bits(From v) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// exp(x); 0 below the smallest normal result (and for -inf), +inf above the largest.
OTK_INLINE float vexp(float x) {
  const float lo = -87.33654f, hi = 88.0f, magic = 12582912.0f;  // magic = 1.5 * 2^23
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  float t = xc * 1.44269504088896341f + magic;  // round(x / ln 2) sits in the low mantissa bits
  float k = t - magic;
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t ki = bits<int32_t>(t) - bits<int32_t>(magic);
  float scale = bits<float>((ki + 127) << 23);
  float y = p * scale;
  y = x < lo ? 0.0f : y;
  return x > hi ? std::numeric_limits<float>::infinity() : y;
}

OTK_INLINE double vexp(double x) {
  const double lo = -708.3964185322641, hi = 709.0, magic = 6755399441055744.0;  // 1.5 * 2^52
  double xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  double t = xc * 1.4426950408889634 + magic;
  double k = t - magic;
  double r = xc - k * 6.93147180369123816490e-01;
  r = r - k * 1.90821492927058770002e-10;
  // Taylor series to degree 13 on |r| <= ln(2)/2: truncation below 2^-56.
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r * r + r + 1.0;
  int64_t ki = bits<int64_t>(t) - bits<int64_t>(magic);
  double scale = bits<double>((ki + 1023) << 52);
  double y = p * scale;
  y = x < lo ? 0.0 : y;
  return x > hi ? std::numeric_limits<double>::infinity() : y;
}

// log(s) for a positive normal s (the LSE sums are >= 1); -inf for s == 0.
OTK_INLINE float vlog(float s) {
  int32_t b = bits<int32_t>(s);
  int32_t e = ((b >> 23) & 0xff) - 127;
  float m = bits<float>((b & 0x7fffff) | 0x3f800000);  // [1, 2)
  bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  float ef = static_cast<float>(big ? e + 1 : e);
  float z = m - 1.0f, zz = z * z;
  float y = 7.0376836292e-2f;
  y = y * z - 1.1514610310e-1f;
  y = y * z + 1.1676998740e-1f;
  y = y * z - 1.2420140846e-1f;
  y = y * z + 1.4249322787e-1f;
  y = y * z - 1.6668057665e-1f;
  y = y * z + 2.0000714765e-1f;
  y = y * z - 2.4999993993e-1f;
  y = y * z + 3.3333331174e-1f;
  y = y * z * zz;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * zz;
  float out = (z + y) + ef * 0.693359375f;
  return s > 0.0f ? out : -std::numeric_limits<float>::infinity();
}

OTK_INLINE double vlog(double s) {
  int64_t b = bits<int64_t>(s);
  // exponent as a double without an int64 -> double conversion: 2^52 + e_biased, minus (2^52 + 1023)
  double e = bits<double>(((b >> 52) & 0x7ff) | 0x4330000000000000LL) - 4503599627371519.0;
  double m = bits<double>((b & 0xfffffffffffffLL) | 0x3ff0000000000000LL);  // [1, 2)
  bool big = m > 1.4142135623730951;
  m = big ? m * 0.5 : m;
  e = big ? e + 1.0 : e;
  // log(m) = 2 atanh(q), q = (m - 1) / (m + 1), |q| <= 0.1716: series to q^23.
  double q = (m - 1.0) / (m + 1.0), q2 = q * q;
  double p = 1.0 / 23.0;
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
  double lm = 2.0 * q + 2.0 * q * q2 * p;
  double out = e * 6.93147180369123816490e-01 + (lm + e * 1.90821492927058770002e-10);
  return s > 0.0 ? out : -std::numeric_limits<double>::infinity();
}

// |exp(t) - 1|, accurate for small |t| (the residual of a nearly converged pair).
OTK_INLINE float vabs_expm1(float t) {
  float p = 1.0f / 362880.0f;
  p = p * t + 1.0f / 40320.0f;
  p = p * t + 1.0f / 5040.0f;
  p = p * t + 1.0f / 720.0f;
  p = p * t + 1.0f / 120.0f;
  p = p * t + 1.0f / 24.0f;
  p = p * t + 1.0f / 6.0f;
  p = p * t + 0.5f;
  float small = t + t * t * p;
  float out = std::fabs(t) < 0.34657359f ? small : vexp(t) - 1.0f;
  return std::fabs(out);
}

OTK_INLINE double vabs_expm1(double t) {
  double p = 1.0 / 20922789888000.0;
  p = p * t + 1.0 / 1307674368000.0;
  p = p * t + 1.0 / 87178291200.0;
  p = p * t + 1.0 / 6227020800.0;
  p = p * t + 1.0 / 479001600.0;
  p = p * t + 1.0 / 39916800.0;
  p = p * t + 1.0 / 3628800.0;
  p = p * t + 1.0 / 362880.0;
  p = p * t + 1.0 / 40320.0;
  p = p * t + 1.0 / 5040.0;
  p = p * t + 1.0 / 720.0;
  p = p * t + 1.0 / 120.0;
  p = p * t + 1.0 / 24.0;
  p = p * t + 1.0 / 6.0;
  p = p * t + 0.5;
  double small = t + t * t * p;
  double out = std::fabs(t) < 0.34657359027997264 ? small : vexp(t) - 1.0;
  return std::fabs(out);
}

template <class T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

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

  // This thread's contiguous share [lo, hi) of [0, n); the split does not change any value.
  void range(int n, int& lo, int& hi) const {
    int q = n / nth, r = n % nth;
    lo = tid * q + std::min(tid, r);
    hi = lo + q + (tid < r ? 1 : 0);
  }
};

// Runs body(b, team, shared) for every pair b, with `shared` a Work object owned by the team.
template <class Work, class Body>
void for_each_pair(int B, int threads, const Work& proto, Body body) {
#ifdef _OPENMP
  if (threads > 1 && B < threads) {
    Work shared = proto;
    for (int b = 0; b < B; ++b) {
#pragma omp parallel num_threads(threads)
      {
        Team team{omp_get_thread_num(), omp_get_num_threads()};
        body(b, team, shared);
      }
    }
    return;
  }
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      Work own = proto;
#pragma omp for schedule(dynamic, 1)
      for (int b = 0; b < B; ++b) body(b, Team{}, own);
    }
    return;
  }
#endif
  Work own = proto;
  for (int b = 0; b < B; ++b) body(b, Team{}, own);
}

// ----------------------------------------------------------------------------------------------
// Cost tile.
// ----------------------------------------------------------------------------------------------

constexpr int kLanes = 16;  // fixed lane count: the summation order does not depend on the ISA

// Sum of a[d] * b[d] in a fixed order: kLanes interleaved partial sums, then a fixed tree.
template <class T>
OTK_INLINE T dot(const T* a, const T* b, int D) {
  T acc[kLanes] = {};
  int d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[d + l] * b[d + l];
  for (int l = 0; d + l < D; ++l) acc[l] += a[d + l] * b[d + l];
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// Four dot products <a0, b0>, <a0, b1>, <a1, b0>, <a1, b1>, each bitwise equal to dot().
template <class T>
OTK_INLINE void dot2x2(const T* a0, const T* a1, const T* b0, const T* b1, int D, T out[4]) {
  T c00[kLanes] = {}, c01[kLanes] = {}, c10[kLanes] = {}, c11[kLanes] = {};
  int d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      T x0 = a0[d + l], x1 = a1[d + l], y0 = b0[d + l], y1 = b1[d + l];
      c00[l] += x0 * y0;
      c01[l] += x0 * y1;
      c10[l] += x1 * y0;
      c11[l] += x1 * y1;
    }
  for (int l = 0; d + l < D; ++l) {
    T x0 = a0[d + l], x1 = a1[d + l], y0 = b0[d + l], y1 = b1[d + l];
    c00[l] += x0 * y0;
    c01[l] += x0 * y1;
    c10[l] += x1 * y0;
    c11[l] += x1 * y1;
  }
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) {
      c00[l] += c00[l + w];
      c01[l] += c01[l + w];
      c10[l] += c10[l + w];
      c11[l] += c11[l + w];
    }
  out[0] = c00[0];
  out[1] = c01[0];
  out[2] = c10[0];
  out[3] = c11[0];
}

template <class T>
OTK_INLINE T half_sq_norm(const T* a, int D) {
  return dot(a, a, D) / T(2);
}

// Rows [i0, i1) of C_ij = max(xx_i + yy_j - <x_i, y_j>, 0), as reference.sqeuclidean_cost.
template <class T>
void cost_rows(const T* x, const T* y, const T* xx, const T* yy, int M, int D, int i0, int i1, T* C) {
  T d4[4];
  int i = i0;
  for (; i + 2 <= i1; i += 2) {
    const T *a0 = x + (int64_t)i * D, *a1 = a0 + D;
    int j = 0;
    for (; j + 2 <= M; j += 2) {
      dot2x2(a0, a1, y + (int64_t)j * D, y + (int64_t)(j + 1) * D, D, d4);
      C[(int64_t)i * M + j] = std::max(xx[i] + yy[j] - d4[0], T(0));
      C[(int64_t)i * M + j + 1] = std::max(xx[i] + yy[j + 1] - d4[1], T(0));
      C[(int64_t)(i + 1) * M + j] = std::max(xx[i + 1] + yy[j] - d4[2], T(0));
      C[(int64_t)(i + 1) * M + j + 1] = std::max(xx[i + 1] + yy[j + 1] - d4[3], T(0));
    }
    for (; j < M; ++j) {
      const T* bj = y + (int64_t)j * D;
      C[(int64_t)i * M + j] = std::max(xx[i] + yy[j] - dot(a0, bj, D), T(0));
      C[(int64_t)(i + 1) * M + j] = std::max(xx[i + 1] + yy[j] - dot(a1, bj, D), T(0));
    }
  }
  for (; i < i1; ++i)
    for (int j = 0; j < M; ++j)
      C[(int64_t)i * M + j] = std::max(xx[i] + yy[j] - dot(x + (int64_t)i * D, y + (int64_t)j * D, D), T(0));
}

// Shared tile of one pair: the cost and the norms.
template <class T>
struct CostTile {
  std::vector<T> C, xx, yy;

  // Forms C [N, M] from x [N, D], y [M, D] with the team; returns with all threads synchronised.
  const T* build(const T* x, const T* y, int N, int M, int D, const Team& team) {
    int lo, hi;
    team.range(N, lo, hi);
    for (int i = lo; i < hi; ++i) xx[i] = half_sq_norm(x + (int64_t)i * D, D);
    team.range(M, lo, hi);
    for (int j = lo; j < hi; ++j) yy[j] = half_sq_norm(y + (int64_t)j * D, D);
    team.sync();
    team.range(N, lo, hi);
    cost_rows(x, y, xx.data(), yy.data(), M, D, lo, hi, C.data());
    team.sync();
    return C.data();
  }
};

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

template <class T>
struct ForwardWork {
  CostTile<T> tile;
  std::vector<T> K, Kt, f, g, ft, gt, rf, rg;

  ForwardWork(int N, int M, bool points) {
    if (points) {
      tile.C.resize((size_t)N * M);
      tile.xx.resize(N);
      tile.yy.resize(M);
    }
    K.resize((size_t)N * M);
    Kt.resize((size_t)N * M);
    for (auto* v : {&f, &ft, &rf}) v->resize(N);
    for (auto* v : {&g, &gt, &rg}) v->resize(M);
  }
};

// out[q] = coef * LSE_r(h_r - A[r, q]) for q in [q0, q1), 0 where logw_q == -inf.
// Lanes run across q; each lane reduces over r in increasing order. Rows with h_r == -inf are skipped
// (exactly what exp(-inf) = 0 would add).
template <class T>
void softmin_pass(const T* A, int R, int ld, const T* h, int q0, int q1, T coef, const T* logw_q, T* out,
                  T* mx, T* sm) {
  const int n = q1 - q0;
  if (n <= 0) return;
  for (int q = 0; q < n; ++q) mx[q] = neg_inf<T>();
  for (int r = 0; r < R; ++r) {
    const T hr = h[r];
    if (hr == neg_inf<T>()) continue;
    const T* a = A + (int64_t)r * ld + q0;
    for (int q = 0; q < n; ++q) {
      T z = hr - a[q];
      mx[q] = mx[q] > z ? mx[q] : z;
    }
  }
  for (int q = 0; q < n; ++q) {
    mx[q] = mx[q] == neg_inf<T>() ? T(0) : mx[q];  // all -inf: sum 0, log -inf, never NaN
    sm[q] = T(0);
  }
  for (int r = 0; r < R; ++r) {
    const T hr = h[r];
    if (hr == neg_inf<T>()) continue;
    const T* a = A + (int64_t)r * ld + q0;
    for (int q = 0; q < n; ++q) sm[q] += vexp((hr - a[q]) - mx[q]);
  }
  for (int q = 0; q < n; ++q) {
    T v = coef * (vlog(sm[q]) + mx[q]);
    out[q0 + q] = logw_q[q0 + q] == neg_inf<T>() ? T(0) : v;
  }
}

// Terms w_i |exp((old_i - new_i) / eps) - 1| (0 on padding) of reference's residual, for [lo, hi).
template <class T>
void residual_terms(const T* old_, const T* new_, const T* w, const T* logw, T eps, int lo, int hi, T* out) {
  for (int i = lo; i < hi; ++i) {
    T term = w[i] * vabs_expm1((old_[i] - new_[i]) / eps);
    out[i] = logw[i] == neg_inf<T>() ? T(0) : term;
  }
}

template <class T>
T ordered_sum(const T* v, int n) {
  T s = T(0);
  for (int i = 0; i < n; ++i) s += v[i];
  return s;
}

// Solves one pair with its team. C [N, M]: the cost (finite everywhere). Outputs at this pair's rows.
template <class T>
void solve_pair(const T* C, const T* alpha, const T* beta, int N, int M, const Plan& plan, bool symmetric,
                ForwardWork<T>& w, const Team& team, T* f_out, T* g_out, T* fp_out, T* gp_out, int32_t* it_out,
                T* err_out) {
  int ilo, ihi, jlo, jhi;
  team.range(N, ilo, ihi);
  team.range(M, jlo, jhi);
  // Thread-local: weights, h vectors, LSE scratch.
  std::vector<T> wa(N), wb(M), h(std::max(N, M)), mx(std::max(N, M)), sm(std::max(N, M));
  for (int i = 0; i < N; ++i) wa[i] = std::exp(alpha[i]);
  for (int j = 0; j < M; ++j) wb[j] = std::exp(beta[j]);

  // K = C / eps [N, M] (column pass) and K^T [M, N] (row pass); symmetric problems need only K^T.
  // eps_k is per thread (every thread of the team follows the same schedule) so the barrier inside
  // is met by all of them or by none.
  double eps_k = -1.0;
  auto set_eps = [&](double e) {
    if (e == eps_k) return;
    const T et = static_cast<T>(e);
    if (!symmetric)
      for (int i = ilo; i < ihi; ++i)
        for (int j = 0; j < M; ++j) w.K[(int64_t)i * M + j] = C[(int64_t)i * M + j] / et;
    for (int j = jlo; j < jhi; ++j)
      for (int i = 0; i < N; ++i) w.Kt[(int64_t)j * N + i] = C[(int64_t)i * M + j] / et;
    team.sync();
    eps_k = e;
  };
  // ft = T(g), gt = T~(f) on this thread's share (gt = ft when symmetric).
  auto update = [&](const T* f, const T* g, double e, T* ft, T* gt) {
    const T et = static_cast<T>(e);
    const T coef = static_cast<T>(-plan.damping(e) * e);
    for (int j = 0; j < M; ++j) h[j] = beta[j] + g[j] / et;
    softmin_pass(w.Kt.data(), M, N, h.data(), ilo, ihi, coef, alpha, ft, mx.data(), sm.data());
    if (symmetric) {
      for (int i = ilo; i < ihi; ++i) gt[i] = ft[i];
      return;
    }
    for (int i = 0; i < N; ++i) h[i] = alpha[i] + f[i] / et;
    softmin_pass(w.K.data(), N, M, h.data(), jlo, jhi, coef, beta, gt, mx.data(), sm.data());
  };
  auto residuals = [&](double e) {
    const T et = static_cast<T>(e);
    residual_terms(w.f.data(), w.ft.data(), wa.data(), alpha, et, ilo, ihi, w.rf.data());
    residual_terms(w.g.data(), w.gt.data(), wb.data(), beta, et, jlo, jhi, w.rg.data());
  };
  auto average = [&]() {
    for (int i = ilo; i < ihi; ++i) w.f[i] = (w.f[i] + w.ft[i]) / T(2);
    for (int j = jlo; j < jhi; ++j) w.g[j] = (w.g[j] + w.gt[j]) / T(2);
  };

  // Symmetric problems have N == M and the column share equals the row share.
  const double eps0 = plan.anneal.empty() ? plan.eps : plan.anneal.front();
  set_eps(eps0);
  std::fill(w.ft.begin() + ilo, w.ft.begin() + ihi, T(0));
  std::fill(w.gt.begin() + jlo, w.gt.begin() + jhi, T(0));
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
    update(w.f.data(), w.g.data(), plan.eps, w.ft.data(), w.gt.data());
    if (plan.tol) residuals(plan.eps);
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
  residuals(plan.eps);
  team.sync();
  for (int i = ilo; i < ihi; ++i) {
    f_out[i] = w.ft[i];
    fp_out[i] = w.f[i];
  }
  for (int j = jlo; j < jhi; ++j) {
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

// out[r] = scale_r * (p_r - sum_c S[r, c] q_c) for rows r in [lo, hi); S [R, Q] rows, q [Q, D], p [R, D].
// Blocks of 4 rows share each loaded q_c; the sum over c runs in increasing order for every row.
template <class T>
void plan_times_points(const T* S, int Q, const T* q, const T* p, const T* scale, int D, int lo, int hi, T* out,
                       T* acc) {
  constexpr int RB = 4, DB = 64;
  int r = lo;
  for (; r + RB <= hi; r += RB) {
    for (int d0 = 0; d0 < D; d0 += DB) {
      const int nd = std::min(DB, D - d0);
      T a[RB][DB] = {};
      for (int c = 0; c < Q; ++c) {
        const T* qc = q + (int64_t)c * D + d0;
        const T s0 = S[(int64_t)(r + 0) * Q + c], s1 = S[(int64_t)(r + 1) * Q + c];
        const T s2 = S[(int64_t)(r + 2) * Q + c], s3 = S[(int64_t)(r + 3) * Q + c];
        if (nd == DB) {
          for (int l = 0; l < DB; ++l) {
            a[0][l] += s0 * qc[l];
            a[1][l] += s1 * qc[l];
            a[2][l] += s2 * qc[l];
            a[3][l] += s3 * qc[l];
          }
        } else {
          for (int l = 0; l < nd; ++l) {
            a[0][l] += s0 * qc[l];
            a[1][l] += s1 * qc[l];
            a[2][l] += s2 * qc[l];
            a[3][l] += s3 * qc[l];
          }
        }
      }
      for (int k = 0; k < RB; ++k) {
        const T* pr = p + (int64_t)(r + k) * D + d0;
        T* o = out + (int64_t)(r + k) * D + d0;
        for (int l = 0; l < nd; ++l) o[l] = scale[r + k] * (pr[l] - a[k][l]);
      }
    }
  }
  for (; r < hi; ++r) {
    std::fill(acc, acc + D, T(0));
    for (int c = 0; c < Q; ++c) {
      const T s = S[(int64_t)r * Q + c];
      const T* qc = q + (int64_t)c * D;
      for (int l = 0; l < D; ++l) acc[l] += s * qc[l];
    }
    const T* pr = p + (int64_t)r * D;
    T* o = out + (int64_t)r * D;
    for (int l = 0; l < D; ++l) o[l] = scale[r] * (pr[l] - acc[l]);
  }
}

// S[r, c] = exp(logw_c + (pot_prev_c - Cat(r, c)) / eps + pot_r / (d eps)), 0 on rows with logw_r == -inf,
// for rows [lo, hi); Cat(r, c) = C[r * sr + c * sc].
template <class T>
void plan_rows(const T* C, int64_t sr, int64_t sc, int Q, const T* logw_c, const T* prev_c, const T* pot_r,
               const T* logw_r, T eps, T deps, int lo, int hi, T* S) {
  for (int r = lo; r < hi; ++r) {
    T* s = S + (int64_t)r * Q;
    if (logw_r[r] == neg_inf<T>()) {
      std::fill(s, s + Q, T(0));
      continue;
    }
    const T fr = pot_r[r] / deps;
    const T* cr = C + r * sr;
    for (int c = 0; c < Q; ++c) s[c] = vexp((logw_c[c] + (prev_c[c] - cr[c * sc]) / eps) + fr);
  }
}

template <class T>
struct BackwardWork {
  CostTile<T> tile;
  std::vector<T> Sx, Sy;

  BackwardWork(int N, int M) {
    tile.C.resize((size_t)N * M);
    tile.xx.resize(N);
    tile.yy.resize(M);
    Sx.resize((size_t)N * M);
    Sy.resize((size_t)N * M);
  }
};

// ----------------------------------------------------------------------------------------------
// Python bindings: numpy buffers in, numpy buffers out; the GIL is released while computing.
// ----------------------------------------------------------------------------------------------

namespace py = pybind11;

template <class T>
using Arr = py::array_t<T, py::array::c_style>;

template <class T>
const T* data_of(const py::array& a, const char* name, std::vector<py::ssize_t> shape) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw std::invalid_argument(std::string(name) + ": dtype differs from the other inputs");
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
                     const py::array& beta_in, const Plan& plan, bool symmetric, int threads) {
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
    ForwardWork<T> proto(N, M, C == nullptr);
    for_each_pair(B, threads, proto, [&](int b, const Team& team, ForwardWork<T>& w) {
      const T* Cb = C ? C + (int64_t)b * N * M
                      : w.tile.build(x + (int64_t)b * N * D, y + (int64_t)b * M * D, N, M, D, team);
      solve_pair(Cb, alpha + (int64_t)b * N, beta + (int64_t)b * M, N, M, plan, symmetric, w, team,
                 fo + (int64_t)b * N, go + (int64_t)b * M, fpo + (int64_t)b * N, gpo + (int64_t)b * M, ito + b,
                 erro + b);
      team.sync();  // the shared work is reused by the next pair
    });
  }
  return py::make_tuple(f, g, fp, gp, its, err);
}

template <class T>
py::tuple grad_impl(const py::array& x_in, const py::array& y_in, const py::array& alpha_in,
                    const py::array& beta_in, const py::array& f_in, const py::array& g_in,
                    const py::array& fp_in, const py::array& gp_in, double eps, double damping,
                    const py::array& u_in, const std::optional<py::array>& v_in, int threads) {
  if (x_in.ndim() != 3 || y_in.ndim() != 3) throw std::invalid_argument("x, y must be [B, N, D], [B, M, D]");
  const int B = (int)x_in.shape(0), N = (int)x_in.shape(1), M = (int)y_in.shape(1), D = (int)x_in.shape(2);
  const T* x = data_of<T>(x_in, "x", {B, N, D});
  const T* y = data_of<T>(y_in, "y", {B, M, D});
  const T* alpha = data_of<T>(alpha_in, "alpha", {B, N});
  const T* beta = data_of<T>(beta_in, "beta", {B, M});
  const T* f = data_of<T>(f_in, "f", {B, N});
  const T* g = data_of<T>(g_in, "g", {B, M});
  const T* fp = data_of<T>(fp_in, "f_prev", {B, N});
  const T* gp = data_of<T>(gp_in, "g_prev", {B, M});
  const T* u = data_of<T>(u_in, "u", {B, N});
  const T* v = v_in ? data_of<T>(*v_in, "v", {B, M}) : nullptr;
  if (!(eps > 0) || !(damping > 0)) throw std::invalid_argument("eps and damping must be > 0");
  Arr<T> dx({B, N, D});
  Arr<T> dy(v ? std::vector<py::ssize_t>{B, M, D} : std::vector<py::ssize_t>{0});
  T* dxo = dx.mutable_data();
  T* dyo = v ? dy.mutable_data() : nullptr;
  {
    py::gil_scoped_release release;
    const T et = static_cast<T>(eps), det = static_cast<T>(damping * eps);
    BackwardWork<T> proto(N, M);
    for_each_pair(B, threads, proto, [&](int b, const Team& team, BackwardWork<T>& w) {
      const T *xb = x + (int64_t)b * N * D, *yb = y + (int64_t)b * M * D;
      const T *ab = alpha + (int64_t)b * N, *bb = beta + (int64_t)b * M;
      const T* C = w.tile.build(xb, yb, N, M, D, team);
      std::vector<T> acc(D);
      int lo, hi;
      team.range(N, lo, hi);
      plan_rows(C, M, 1, M, bb, gp + (int64_t)b * M, f + (int64_t)b * N, ab, et, det, lo, hi, w.Sx.data());
      plan_times_points(w.Sx.data(), M, yb, xb, u + (int64_t)b * N, D, lo, hi, dxo + (int64_t)b * N * D, acc.data());
      if (v) {
        team.range(M, lo, hi);
        plan_rows(C, 1, M, N, ab, fp + (int64_t)b * N, g + (int64_t)b * M, bb, et, det, lo, hi, w.Sy.data());
        plan_times_points(w.Sy.data(), N, xb, yb, v + (int64_t)b * M, D, lo, hi, dyo + (int64_t)b * M * D,
                          acc.data());
      }
      team.sync();  // the shared tile is reused by the next pair
    });
  }
  if (!v) return py::make_tuple(dx, py::none());
  return py::make_tuple(dx, dy);
}

bool is_f64(const py::array& a) { return py::isinstance<py::array_t<double>>(a); }

}  // namespace otk

PYBIND11_MODULE(_sinkhorn, m) {
  namespace py = pybind11;
  using namespace otk;
  m.doc() = "Fused log-domain Sinkhorn on CPU (see kernels/cpu/launch.py for the Python-facing API).";
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
        return is_f64(C) ? solve_impl<double>(&C, nullptr, nullptr, alpha, beta, plan, symmetric, threads)
                         : solve_impl<float>(&C, nullptr, nullptr, alpha, beta, plan, symmetric, threads);
      },
      py::arg("C"), py::arg("alpha"), py::arg("beta"), py::arg("anneal"), py::arg("eps"), py::arg("n_iters"),
      py::arg("tol"), py::arg("rho"), py::arg("symmetric"), py::arg("threads"),
      "Sinkhorn on costs C [B, N, M]; returns (f, g, f_prev, g_prev, n_iters, error) as numpy arrays.");
  m.def(
      "solve_points",
      [](const py::array& x, const py::array& y, const py::array& alpha, const py::array& beta,
         const std::vector<double>& anneal, double eps, int64_t n_iters, std::optional<double> tol,
         std::optional<double> rho, bool symmetric, int threads) {
        Plan plan = make_plan(anneal, eps, n_iters, tol, rho);
        return is_f64(x) ? solve_impl<double>(nullptr, &x, &y, alpha, beta, plan, symmetric, threads)
                         : solve_impl<float>(nullptr, &x, &y, alpha, beta, plan, symmetric, threads);
      },
      py::arg("x"), py::arg("y"), py::arg("alpha"), py::arg("beta"), py::arg("anneal"), py::arg("eps"),
      py::arg("n_iters"), py::arg("tol"), py::arg("rho"), py::arg("symmetric"), py::arg("threads"),
      "Sinkhorn on the sqeuclidean cost of x [B, N, D], y [B, M, D]; returns as solve_cost.");
  m.def(
      "grad_points",
      [](const py::array& x, const py::array& y, const py::array& alpha, const py::array& beta, const py::array& f,
         const py::array& g, const py::array& f_prev, const py::array& g_prev, double eps, double damping,
         const py::array& u, const std::optional<py::array>& v, int threads) {
        return is_f64(x) ? grad_impl<double>(x, y, alpha, beta, f, g, f_prev, g_prev, eps, damping, u, v, threads)
                         : grad_impl<float>(x, y, alpha, beta, f, g, f_prev, g_prev, eps, damping, u, v, threads);
      },
      py::arg("x"), py::arg("y"), py::arg("alpha"), py::arg("beta"), py::arg("f"), py::arg("g"), py::arg("f_prev"),
      py::arg("g_prev"), py::arg("eps"), py::arg("damping"), py::arg("u"), py::arg("v"), py::arg("threads"),
      "Envelope gradients (dx [B, N, D], dy [B, M, D] or None) through the final step, sqeuclidean cost.");
}
