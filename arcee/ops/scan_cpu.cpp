// The CPU selective scan: one fused pass forward, one recompute + reverse pass backward.
//
// Compiled on first use by arcee/ops/scan_cpu.py (C++17 with GCC vector extensions, no torch
// headers) and called through ctypes. Math: REFERENCE.md section 1 / docs/ops.md.
//
// Layout. A task owns W = 16 channels of one batch element (forward) or a whole group of one
// batch element (backward, which sums dB and dC over the group's channels). Vectors run across
// the W channels, so B_t[k] and C_t[k] are scalar broadcasts, sum_k C h and sum_k lam B are
// plain vector adds, and the state h[k] (k < n) is n vectors. Time is walked in chunks of T
// steps; the forward saves the state entering every chunk, the backward recomputes the chunk's
// states from it (keeping a_t and h_t of the chunk in a buffer), then runs the adjoint
// lam_t = gy_t C_t + a_{t+1} lam_{t+1} backwards through the chunk. Nothing state-sized ever
// goes to memory except the saved chunk-entry states. A tail chunk is just shorter (no padded
// steps). Channels past the group's end are zero lanes that are never stored.
//
// Threads: tasks are claimed from an atomic counter by the caller and by up to threads - 1
// helpers of a small pool that sleep on a condition variable. The caller never waits for a
// helper that has not started: a late helper finds no task left. So two threads on a busy
// machine cost at most the task a descheduled helper holds, not a scheduler slice per op.
#include <pthread.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr int W = 16;  // channels per vector

template <typename T> struct VecOf;
template <> struct VecOf<float> {
  typedef float type __attribute__((vector_size(W * sizeof(float))));
  typedef int32_t itype __attribute__((vector_size(W * sizeof(int32_t))));
};
template <> struct VecOf<double> {
  typedef double type __attribute__((vector_size(W * sizeof(double))));
  typedef int64_t itype __attribute__((vector_size(W * sizeof(int64_t))));
};

// In-place transpose of a W x W block held as W vectors: swap the off-diagonal s x s blocks for
// s = 8, 4, 2, 1, each swap one two-input shuffle per vector (vpermt2ps with AVX-512).
template <typename V, typename I>
inline void transpose(V* r) {
  const I lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#pragma GCC unroll 4
  for (int s = W / 2; s >= 1; s /= 2) {
    // row i (bit s clear) takes row i + s's lanes k - s; row i + s takes row i's lanes k + s
    const I lo = (lane & s) ? lane + (W - s) : lane, hi = (lane & s) ? lane + W : lane + s;
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i)
      if (!(i & s)) {
        const V a = r[i], b = r[i + s];
        r[i] = __builtin_shuffle(a, b, lo);
        r[i + s] = __builtin_shuffle(a, b, hi);
      }
  }
}

// 2^x, lane-wise. float: Cephes' exp2f polynomial on [-1/2, 1/2] (about 1 ulp), exponent by
// integer add; NaN propagates, x < -126 gives 0, x > 127 gives inf.
inline VecOf<float>::type exp2v(VecOf<float>::type x) {
  typedef VecOf<float>::type V;
  typedef VecOf<float>::itype I;
  // No clamping: out of [-126, 127] (and NaN) the lanes are garbage until the selects below.
  const V magic = V{} + 12582912.0f;  // 1.5 * 2^23
  V r = (x + magic) - magic;  // round to nearest
  V f = x - r;
  V p = V{} + 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  I e = __builtin_convertvector(r, I) << 23;
  V y = (V)((I)p + e);
  y = x < -126.0f ? V{} : y;
  y = x > 127.0f ? V{} + INFINITY : y;
  return x != x ? x : y;
}

// double (the float64 oracle tests and gradcheck): libm, lane by lane.
inline VecOf<double>::type exp2v(VecOf<double>::type x) {
  VecOf<double>::type y;
  for (int i = 0; i < W; ++i) y[i] = std::exp2(x[i]);
  return y;
}

constexpr double LOG2E = 1.4426950408889634;

// log(1 + y) for 0 <= y <= 1 (or NaN). log(x) on x = 1 + y in [1, 2] by Cephes' logf polynomial,
// and log1p(y) = log(x) y / (x - 1), which corrects the rounding of 1 + y (y itself when x == 1).
inline VecOf<float>::type log1p01(VecOf<float>::type y) {
  typedef VecOf<float>::type V;
  const V one = V{} + 1.0f;
  const V x1 = one + y;
  const auto big = x1 > 1.41421356f;
  const V x = (big ? x1 * 0.5f : x1) - one;  // log(x1) = log(1 + x) + (big ? log 2 : 0)
  const V e = big ? one : V{};
  V p = V{} + 7.0376836292e-2f;
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  const V z = x * x;
  V r = x * z * p - 2.12194440e-4f * e - 0.5f * z;
  r = x + r + 0.693359375f * e;
  const V d = x1 - one;
  return d == 0 ? y : r * (y / d);
}

// softplus with torch's threshold 20 (the identity above): max(v, 0) + log1p(exp(-|v|)).
inline VecOf<float>::type softplus(VecOf<float>::type v) {
  typedef VecOf<float>::type V;
  const V m = v > 0 ? v : V{};
  const V r = m + log1p01(exp2v((m + m - v) * float(-LOG2E)));  // |v| = 2 max(v, 0) - v
  return v > 20.0f ? v : r;
}

inline VecOf<double>::type softplus(VecOf<double>::type v) {
  VecOf<double>::type y;
  for (int i = 0; i < W; ++i) y[i] = v[i] > 20.0 ? v[i] : std::log1p(std::exp(v[i]));
  return y;
}

// ------------------------------------------------------------------------------------ pool

struct Job {
  std::function<void(int64_t)> fn;
  int64_t ntasks;
  std::atomic<int64_t> next{0}, done{0};
};

void work(Job& job) {
  for (int64_t i; (i = job.next.fetch_add(1)) < job.ntasks;) {
    job.fn(i);
    job.done.fetch_add(1, std::memory_order_release);
  }
}

class Pool {
 public:
  // Helpers only when each thread gets >= 4 tasks: a helper descheduled mid-task then delays
  // the caller by at most a quarter of its share (with 2 tasks on 2 threads, by all of it).
  void run(int64_t ntasks, int threads, const std::function<void(int64_t)>& fn) {
    threads = (int)std::min<int64_t>(threads, ntasks / 4);
    if (threads <= 1) {
      for (int64_t i = 0; i < ntasks; ++i) fn(i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->fn = fn;
    job->ntasks = ntasks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int i = (int)helpers_.size(); i < threads - 1; ++i) helpers_.emplace_back([this, i] { loop(i); });
      job_ = job;
      wanted_ = threads - 1;
      ++generation_;
    }
    cv_.notify_all();
    work(*job);
    while (job->done.load(std::memory_order_acquire) < ntasks) std::this_thread::yield();
    std::lock_guard<std::mutex> lock(mu_);
    if (job_ == job) job_.reset();
  }

 private:
  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= wanted_) continue;  // fewer threads asked for this time
        job = job_;
      }
      if (job) work(*job);
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> helpers_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
  int wanted_ = 0;
};

Pool* pool = nullptr;
std::once_flag pool_once;

Pool& get_pool() {
  std::call_once(pool_once, [] {
    pool = new Pool();
    // A forked child (e.g. a DataLoader worker) has none of the helper threads: start afresh.
    pthread_atfork(nullptr, nullptr, [] { pool = new Pool(); });
  });
  return *pool;
}

template <typename T>
T* scratch(std::vector<T>& buf, size_t size) {
  if (buf.size() < size) buf.resize(size);
  return buf.data();
}

}  // namespace

// ------------------------------------------------------------------------------------ kernels

// Shapes as in selective_scan_fn, every tensor contiguous and of one dtype (float or double):
// u, delta, z, dout, out, du, ddelta, dz: (b, d, l); A: (d, n); B, C, dB, dC: (b, g, n, l);
// D, delta_bias, dD, ddelta_bias: (d,); h0, hT, dhT, dh0: (b, d, n); dA: (d, n).
// saved: (b, nchunks, g, tiles, n, W), tiles = ceil(d / g / W): the state entering each chunk.
// Optional pointers are null when absent.
struct ScanArgs {
  int64_t b, d, l, n, g, T, softplus, threads;
  const void *u, *delta, *A, *B, *C, *D, *z, *delta_bias, *h0;
  void *out, *hT, *saved;
  const void *dout, *dhT;
  void *du, *ddelta, *dA, *dB, *dC, *dD, *dz, *ddelta_bias, *dh0;
};

namespace {

template <typename T>
struct Scan {
  typedef typename VecOf<T>::type V;
  typedef typename VecOf<T>::itype I;
  const ScanArgs& a;
  const int64_t e, tiles, nchunks;
  std::vector<T> dA_b, dD_b, dbias_b;  // backward: per batch element, summed at the end

  explicit Scan(const ScanArgs& args)
      : a(args), e(a.d / a.g), tiles((e + W - 1) / W), nchunks((a.l + a.T - 1) / a.T) {}

  const T* in(const void* p) const { return static_cast<const T*>(p); }
  T* out(void* p) const { return static_cast<T*>(p); }
  T* saved_at(int64_t bi, int64_t ci, int64_t gi, int64_t j) const {
    return out(a.saved) + (((bi * nchunks + ci) * a.g + gi) * tiles + j) * a.n * W;
  }

  // x: (b, d, l). Rows c0 .. c0 + nv of batch element bi, steps t0 .. t0 + len -> buf[t][lane]
  // (lanes past nv are 0), and back.
  // Whole W x W blocks go through vector transposes, the rest element by element.
  void load_tile(const T* x, int64_t bi, int64_t c0, int nv, int64_t t0, int64_t len, V* buf) const {
    const T* rows = x + (bi * a.d + c0) * a.l + t0;
    const int64_t full = nv == W ? len / W * W : 0;
    for (int64_t t = 0; t < full; t += W) {
      for (int i = 0; i < W; ++i) std::memcpy(&buf[t + i], rows + i * a.l + t, sizeof(V));
      transpose<V, I>(buf + t);
    }
    std::fill(buf + full, buf + len, V{});
    for (int i = 0; i < nv; ++i)
      for (int64_t t = full; t < len; ++t) buf[t][i] = rows[i * a.l + t];
  }
  void store_tile(void* x, int64_t bi, int64_t c0, int nv, int64_t t0, int64_t len, const V* buf) const {
    T* rows = out(x) + (bi * a.d + c0) * a.l + t0;
    const int64_t full = nv == W ? len / W * W : 0;
    for (int64_t t = 0; t < full; t += W) {
      V blk[W];
      std::copy(buf + t, buf + t + W, blk);
      transpose<V, I>(blk);
      for (int i = 0; i < W; ++i) std::memcpy(rows + i * a.l + t, &blk[i], sizeof(V));
    }
    for (int i = 0; i < nv; ++i)
      for (int64_t t = full; t < len; ++t) rows[i * a.l + t] = buf[t][i];
  }
  // x: (d, n) (or one batch element's (d, n)): channels c0 .. c0 + nv -> n vectors, and back.
  void load_cn(const T* x, int64_t c0, int nv, T scale, V* v) const {
    for (int64_t k = 0; k < a.n; ++k) {
      v[k] = V{};
      for (int i = 0; i < nv; ++i) v[k][i] = scale * x[(c0 + i) * a.n + k];
    }
  }
  void store_cn(T* x, int64_t c0, int nv, const V* v) const {
    for (int64_t k = 0; k < a.n; ++k)
      for (int i = 0; i < nv; ++i) x[(c0 + i) * a.n + k] = v[k][i];
  }
  V load_c(const void* x, int64_t c0, int nv) const {  // (d,) -> one vector; 0 when absent
    V v = V{};
    if (x)
      for (int i = 0; i < nv; ++i) v[i] = in(x)[c0 + i];
    return v;
  }

  static V sigmoid(V x) { return 1 / (1 + exp2v(x * T(-LOG2E))); }

  // dt = softplus(delta + delta_bias) (or without softplus) into dt, v = delta + delta_bias into v.
  void load_dt(int64_t bi, int64_t c0, int nv, int64_t t0, int64_t len, V* dt, V* v) const {
    load_tile(in(a.delta), bi, c0, nv, t0, len, v);
    const V bias = load_c(a.delta_bias, c0, nv);
    for (int64_t t = 0; t < len; ++t) {
      v[t] += bias;
      dt[t] = a.softplus ? softplus(v[t]) : v[t];
    }
  }

  // Forward: task = (batch element, group, tile of W channels).
  void forward_task(int64_t task) const {
    const int64_t n = a.n, l = a.l, T_ = a.T;
    const int64_t bi = task / (a.g * tiles), gi = task / tiles % a.g, j = task % tiles;
    const int64_t c0 = gi * e + j * W;
    const int nv = (int)std::min<int64_t>(W, e - j * W);
    thread_local std::vector<V> buf;
    V* A2 = scratch(buf, 2 * n + 5 * T_);  // A log2(e): exp(dt A) = 2^(dt A2)
    V *h = A2 + n, *u = h + n, *dt = u + T_, *v = dt + T_, *z = v + T_, *y = z + T_;
    load_cn(in(a.A), c0, nv, T(LOG2E), A2);
    if (a.h0) load_cn(in(a.h0) + bi * a.d * n, c0, nv, 1, h);
    else std::fill(h, h + n, V{});
    const V D = load_c(a.D, c0, nv);
    const T* Bg = in(a.B) + (bi * a.g + gi) * n * l;
    const T* Cg = in(a.C) + (bi * a.g + gi) * n * l;
    for (int64_t ci = 0; ci < nchunks; ++ci) {
      const int64_t t0 = ci * T_, len = std::min(T_, l - t0);
      std::memcpy(saved_at(bi, ci, gi, j), h, n * sizeof(V));  // saved may be unaligned
      load_tile(in(a.u), bi, c0, nv, t0, len, u);
      load_dt(bi, c0, nv, t0, len, dt, v);
      if (a.z) load_tile(in(a.z), bi, c0, nv, t0, len, z);
      for (int64_t t = 0; t < len; ++t) {
        const V dtt = dt[t], dtu = dtt * u[t];
        const T *Bt = Bg + t0 + t, *Ct = Cg + t0 + t;
        V acc = D * u[t];
        for (int64_t k = 0; k < n; ++k) {
          h[k] = exp2v(dtt * A2[k]) * h[k] + dtu * Bt[k * l];
          acc += Ct[k * l] * h[k];
        }
        y[t] = a.z ? acc * z[t] * sigmoid(z[t]) : acc;
      }
      store_tile(a.out, bi, c0, nv, t0, len, y);
    }
    store_cn(out(a.hT) + bi * a.d * n, c0, nv, h);
  }

  // Backward: task = (batch element, group). Chunks in reverse; inside a chunk, every tile of
  // the group recomputes its states from the saved entry state and runs the adjoint, adding
  // into the chunk's dB, dC (vectors across channels, summed over lanes once per chunk).
  void backward_task(int64_t task) {
    const int64_t n = a.n, l = a.l, T_ = a.T;
    const int64_t bi = task / a.g, gi = task % a.g;
    thread_local std::vector<V> buf;
    V* lam = scratch(buf, 2 * tiles * n + 4 * T_ * n + 3 * n + 8 * T_ + 2 * tiles);
    V* dA = lam + tiles * n;     // (tiles, n): sum_t dt_t q_t
    V* at = dA + tiles * n;      // (T, n): a_t of the chunk
    V* hs = at + T_ * n;         // (T + 1, n): h_{t-1} at row t; row 0 the chunk's entry state
    V* dBv = hs + (T_ + 1) * n;  // (T, n): dB before the sum over lanes
    V* dCv = dBv + T_ * n;       // (T, n)
    V* A2 = dCv + T_ * n;        // (n): A log2(e)
    V* A1 = A2 + n;              // (n): A
    V *u = A1 + n, *dt = u + T_, *v = dt + T_, *z = v + T_, *go = z + T_, *gy = go + T_,
      *g1 = gy + T_, *g2 = g1 + T_;
    V *dD = g2 + T_, *dbias = dD + tiles;  // (tiles)
    // lam (tiles, n): a_{t+1} lam_{t+1} entering the current step from the future; dL/dh_T at first
    for (int64_t j = 0; j < tiles; ++j) {
      const int64_t c0 = gi * e + j * W;
      const int nv = (int)std::min<int64_t>(W, e - j * W);
      if (a.dhT) load_cn(in(a.dhT) + bi * a.d * n, c0, nv, 1, lam + j * n);
      else std::fill(lam + j * n, lam + (j + 1) * n, V{});
    }
    std::fill(dA, dA + tiles * n, V{});
    std::fill(dD, dD + 2 * tiles, V{});
    const T* Bg = in(a.B) + (bi * a.g + gi) * n * l;
    const T* Cg = in(a.C) + (bi * a.g + gi) * n * l;
    for (int64_t ci = nchunks - 1; ci >= 0; --ci) {
      const int64_t t0 = ci * T_, len = std::min(T_, l - t0);
      std::fill(dBv, dBv + len * n, V{});
      std::fill(dCv, dCv + len * n, V{});
      for (int64_t j = 0; j < tiles; ++j) {
        const int64_t c0 = gi * e + j * W;
        const int nv = (int)std::min<int64_t>(W, e - j * W);
        load_cn(in(a.A), c0, nv, T(LOG2E), A2);
        load_cn(in(a.A), c0, nv, 1, A1);
        const V D = load_c(a.D, c0, nv);
        load_tile(in(a.u), bi, c0, nv, t0, len, u);
        load_dt(bi, c0, nv, t0, len, dt, v);
        load_tile(in(a.dout), bi, c0, nv, t0, len, go);
        if (a.z) load_tile(in(a.z), bi, c0, nv, t0, len, z);
        std::copy(saved_at(bi, ci, gi, j), saved_at(bi, ci, gi, j) + n * W, (T*)hs);
        // recompute the chunk's states; y for dz, gy = dL/dy, dC
        for (int64_t t = 0; t < len; ++t) {
          const V dtt = dt[t], dtu = dtt * u[t];
          const T *Bt = Bg + t0 + t, *Ct = Cg + t0 + t;
          V *a_t = at + t * n, *h_prev = hs + t * n, *h_t = h_prev + n, *dC_t = dCv + t * n;
          V acc = D * u[t];
          for (int64_t k = 0; k < n; ++k) {
            a_t[k] = exp2v(dtt * A2[k]);
            h_t[k] = a_t[k] * h_prev[k] + dtu * Bt[k * l];
            acc += Ct[k * l] * h_t[k];
          }
          V g = go[t];
          if (a.z) {
            const V s = sigmoid(z[t]);
            g1[t] = go[t] * acc * s * (1 + z[t] * (1 - s));  // dz
            g = go[t] * z[t] * s;
          }
          gy[t] = g;
          dD[j] += g * u[t];
          for (int64_t k = 0; k < n; ++k) dC_t[k] += g * h_t[k];
        }
        if (a.z) store_tile(a.dz, bi, c0, nv, t0, len, g1);
        // the adjoint, backwards through the chunk
        V *lam_j = lam + j * n, *dAj = dA + j * n;
        for (int64_t t = len - 1; t >= 0; --t) {
          const V dtt = dt[t], dtu = dtt * u[t], g = gy[t];
          const T *Bt = Bg + t0 + t, *Ct = Cg + t0 + t;
          const V *a_t = at + t * n, *h_prev = hs + t * n;
          V* dB_t = dBv + t * n;
          V lamB = V{}, Aq = V{};
          for (int64_t k = 0; k < n; ++k) {
            const V lm = g * Ct[k * l] + lam_j[k];  // lam_t
            const V q = lm * a_t[k] * h_prev[k];    // lam_t a_t h_{t-1}
            dB_t[k] += lm * dtu;
            lamB += lm * Bt[k * l];
            Aq += q * A1[k];
            dAj[k] += dtt * q;
            lam_j[k] = a_t[k] * lm;
          }
          g1[t] = dtt * lamB + D * g;  // du
          V ddt = lamB * u[t] + Aq;    // dL/d dt
          if (a.softplus) ddt = v[t] > T(20) ? ddt : ddt * sigmoid(v[t]);
          g2[t] = ddt;                 // ddelta
          dbias[j] += ddt;
        }
        store_tile(a.du, bi, c0, nv, t0, len, g1);
        store_tile(a.ddelta, bi, c0, nv, t0, len, g2);
      }
      T* dBg = out(a.dB) + (bi * a.g + gi) * n * l + t0;
      T* dCg = out(a.dC) + (bi * a.g + gi) * n * l + t0;
      for (int64_t t = 0; t < len; ++t)
        for (int64_t k = 0; k < n; ++k) {
          T sb = 0, sc = 0;
          for (int i = 0; i < W; ++i) sb += dBv[t * n + k][i], sc += dCv[t * n + k][i];
          dBg[k * l + t] = sb;
          dCg[k * l + t] = sc;
        }
    }
    for (int64_t j = 0; j < tiles; ++j) {
      const int64_t c0 = gi * e + j * W;
      const int nv = (int)std::min<int64_t>(W, e - j * W);
      store_cn(dA_b.data() + bi * a.d * n, c0, nv, dA + j * n);
      if (a.dh0) store_cn(out(a.dh0) + bi * a.d * n, c0, nv, lam + j * n);  // a_0 lam_0
      for (int i = 0; i < nv; ++i) {
        dD_b[bi * a.d + c0 + i] = dD[j][i];
        dbias_b[bi * a.d + c0 + i] = dbias[j][i];
      }
    }
  }

  void forward() {
    get_pool().run(a.b * a.g * tiles, (int)a.threads, [this](int64_t i) { forward_task(i); });
  }

  void backward() {
    dA_b.resize(a.b * a.d * a.n);
    dD_b.resize(a.b * a.d);
    dbias_b.resize(a.b * a.d);
    get_pool().run(a.b * a.g, (int)a.threads, [this](int64_t i) { backward_task(i); });
    // sums over the batch, in a fixed order (deterministic whatever the threads)
    sum_batch(dA_b, a.d * a.n, a.dA);
    sum_batch(dD_b, a.d, a.dD);
    sum_batch(dbias_b, a.d, a.ddelta_bias);
  }

  void sum_batch(const std::vector<T>& x, int64_t size, void* dst) const {
    if (!dst) return;
    T* y = out(dst);
    std::copy(x.begin(), x.begin() + size, y);
    for (int64_t bi = 1; bi < a.b; ++bi)
      for (int64_t i = 0; i < size; ++i) y[i] += x[bi * size + i];
  }
};

}  // namespace

extern "C" {
void arcee_scan_fwd_f32(const ScanArgs* a) { Scan<float>(*a).forward(); }
void arcee_scan_fwd_f64(const ScanArgs* a) { Scan<double>(*a).forward(); }
void arcee_scan_bwd_f32(const ScanArgs* a) { Scan<float>(*a).backward(); }
void arcee_scan_bwd_f64(const ScanArgs* a) { Scan<double>(*a).backward(); }
}
