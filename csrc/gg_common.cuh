// Device code shared by sde_step.cu and policy_loss.cu: dtype I/O, the step coefficients, the transition
// mean, the chunk layout and the deterministic reductions. Everything that must come out bit-identical in
// both ops (mu, the per-chunk sum of (x'-mu)^2, the per-sample sum of partials, log p) is defined here once,
// with explicitly rounded arithmetic (no FMA contraction can differ between the two kernels).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "gg_kernels.h"

namespace gg {

constexpr int kBlock = GG_BLOCK;
constexpr int kItems = GG_ITEMS;
constexpr int kChunk = GG_CHUNK;
constexpr int kWarps = kBlock / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr double kLogSqrt2Pi = 0.91893853320467274178;  // 0.5*log(2*pi), reference.LOG_SQRT_2PI

// ---- compute type and I/O ---------------------------------------------------------------------------
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// Stores round to nearest even, as torch's .to(dtype) does.
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// The value a TC number takes once stored as T.
template <typename T>
__device__ __forceinline__ typename Acc<T>::type rounded(typename Acc<T>::type v) {
  T t;
  store(&t, v);
  return load(&t);
}

// ---- explicitly rounded arithmetic (never contracted into FMAs by the compiler) -----------------------
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float log_(float a) { return logf(a); }
__device__ __forceinline__ double log_(double a) { return ::log(a); }
__device__ __forceinline__ float exp_(float a) { return expf(a); }
__device__ __forceinline__ double exp_(double a) { return ::exp(a); }
__device__ __forceinline__ float expm1_(float a) { return expm1f(a); }
__device__ __forceinline__ double expm1_(double a) { return ::expm1(a); }

// ---- per-sample coefficients: reference.step_coefficients, in float64, same operation order -----------
struct Coef {
  double std_dev_t, std, a, b, beta, dt;  // mu = a*x + b*v, x' = mu + std*z, b = beta*dt
};

// The failed sigma checks of sample i (gg_kernels.h), as bits 0 sigma, 1 sigma_next, 2 sigma_next == 0 refused;
// 0 when valid (NaN fails every comparison).
__device__ __forceinline__ int sigma_error_bits(const gg_schedule& s, int64_t i) {
  const double sig = s.sigma ? s.sigma[i] : s.sigma_value;
  const double nxt = s.sigma_next ? s.sigma_next[i] : s.sigma_next_value;
  return ((sig > 0.0 && sig <= 1.0) ? 0 : 1) | ((nxt >= 0.0 && nxt < sig) ? 0 : 2) |
         ((s.refuse_zero_next && nxt == 0.0) ? 4 : 0);
}

__device__ __forceinline__ Coef step_coef(const gg_schedule& s, int64_t i) {
  const double sig = s.sigma ? s.sigma[i] : s.sigma_value;
  const double nxt = s.sigma_next ? s.sigma_next[i] : s.sigma_next_value;
  Coef c;
  if (s.check && sigma_error_bits(s, i) != 0) {  // a failed sample: NaN everywhere it goes
    c.std_dev_t = c.std = c.a = c.b = c.beta = c.dt = __longlong_as_double(0x7ff8000000000000LL);
    return c;
  }
  c.dt = sub(nxt, sig);
  if (s.dynamics == GG_CPS) {  // s = sigma' sin(eta pi/2), c = sqrt(sigma'^2 - s^2)
    c.std = mul(nxt, s.sin_half_pi_eta);
    c.std_dev_t = c.std;
    const double cc = __dsqrt_rn(fmax(sub(mul(nxt, nxt), mul(c.std, c.std)), 0.0));
    c.a = add(sub(1.0, nxt), cc);
    c.b = sub(mul(sub(1.0, sig), cc), mul(sig, sub(1.0, nxt)));
    c.beta = div(c.b, c.dt);
  } else {  // flow: std_dev_t = eta sqrt(sigma / (1 - sigma~)), sigma~ = sigma' at sigma == 1; dance: eta
    const double sig_tilde = (sig == 1.0) ? nxt : sig;
    c.std_dev_t = (s.dynamics == GG_FLOW) ? mul(s.eta, __dsqrt_rn(div(sig, sub(1.0, sig_tilde)))) : s.eta;
    const double var = mul(c.std_dev_t, c.std_dev_t);
    c.std = mul(c.std_dev_t, __dsqrt_rn(-c.dt));
    c.a = add(1.0, div(mul(var, c.dt), mul(2.0, sig)));
    c.beta = add(1.0, div(mul(var, sub(1.0, sig)), mul(2.0, sig)));
    c.b = mul(c.beta, c.dt);
  }
  return c;
}

// mu = a*x + b*v (reference.transition_mean): two rounded products, one rounded sum.
template <typename TC>
__device__ __forceinline__ TC transition_mean(TC a, TC b, TC x, TC v) {
  return add(mul(a, x), mul(b, v));
}

// log p from the sum over D of (x'-mu)^2 (reference.log_prob_from_mean), s = transition std in TC.
template <typename TC>
__device__ __forceinline__ TC log_prob_from_sum(TC sum, int64_t D, TC s, int dynamics) {
  const TC sq = div(sum, static_cast<TC>(D));
  if (dynamics == GG_CPS) return -sq;
  return sub(sub(div(-sq, mul(mul(TC(2), s), s)), log_(s)), static_cast<TC>(kLogSqrt2Pi));
}

// ---- chunk layout: block (i, c) owns elements c*kChunk + k*kBlock + tid, k < kItems, of sample i --------
struct ChunkPos {
  int64_t sample;
  int chunk;
};
__device__ __forceinline__ ChunkPos chunk_pos(int nchunks) {
  return {static_cast<int64_t>(blockIdx.x) / nchunks, static_cast<int>(blockIdx.x % nchunks)};
}
__device__ __forceinline__ int64_t elem_in_sample(int chunk, int k) {
  return static_cast<int64_t>(chunk) * kChunk + k * kBlock + threadIdx.x;
}

// ---- vector layout (args.vec = 1): thread t of block (i, c) owns the kItems contiguous elements from
// c*kChunk + t*kItems, moved in 16-byte accesses where every row of the call is 16-byte aligned (GG_ALIGNED) and
// element by element otherwise (a ragged last chunk, a misaligned row): the same elements in the same order
// either way, so the sums and log p do not depend on alignment. The strided layout (vec = 0) above stays the
// default until the GPU test suite has passed with this one.
// A thread's place in it: sample and chunk (as chunk_pos), its first element, and how many of its kItems exist
// in a row of D (0 past the end of a ragged last chunk).
struct VecPos {
  int64_t sample;
  int chunk;
  int64_t first;
  int n;
};
__device__ __forceinline__ VecPos vec_pos(int nchunks, int64_t D) {
  const ChunkPos pos = chunk_pos(nchunks);
  const int64_t first = static_cast<int64_t>(pos.chunk) * kChunk + static_cast<int64_t>(threadIdx.x) * kItems;
  const int64_t left = D - first;
  return {pos.sample, pos.chunk, first, left <= 0 ? 0 : (left >= kItems ? kItems : static_cast<int>(left))};
}

// 16 bytes of X, moved as one access (an aggregate of X: no type punning).
template <typename X>
struct alignas(16) Pack16 {
  X v[16 / sizeof(X)];
};

// True on a GPU (the launcher checked the rows); tests/cuda_emu defines it to fail the launch, and take the
// element path instead, where a 16-byte access would be misaligned (x86 would not notice, a GPU faults).
#ifndef GG_ALIGNED16
#define GG_ALIGNED16(p) true
#endif

// n = how many of the kItems elements from p exist; out[j] = p[j] (compute type) for j < n, 0 beyond.
template <typename X, typename TC>
__device__ __forceinline__ void load_items(const X* p, int n, bool wide, TC (&out)[kItems]) {
  if (wide && n == kItems && GG_ALIGNED16(p)) {
    constexpr int per = 16 / sizeof(X);
#pragma unroll
    for (int q = 0; q < kItems / per; ++q) {
      const Pack16<X> pack = reinterpret_cast<const Pack16<X>*>(p)[q];
#pragma unroll
      for (int j = 0; j < per; ++j) out[q * per + j] = load(&pack.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) out[j] = j < n ? load(p + j) : TC(0);
  }
}

// p[j] = v[j] rounded to X, for j < n.
template <typename X, typename TC>
__device__ __forceinline__ void store_items(X* p, int n, bool wide, const TC (&v)[kItems]) {
  if (wide && n == kItems && GG_ALIGNED16(p)) {
    constexpr int per = 16 / sizeof(X);
#pragma unroll
    for (int q = 0; q < kItems / per; ++q) {
      Pack16<X> pack;
#pragma unroll
      for (int j = 0; j < per; ++j) store(&pack.v[j], v[q * per + j]);
      reinterpret_cast<Pack16<X>*>(p)[q] = pack;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j)
      if (j < n) store(p + j, v[j]);
  }
}

}  // namespace gg

// Host side: true if every row of a (B, D) array at p with the given batch stride (elements of elem_size
// bytes) starts on a 16-byte boundary (p == nullptr: not used, true).
inline bool gg_rows_aligned(const void* p, int64_t row_stride, size_t elem_size) {
  return p == nullptr ||
         (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (static_cast<uint64_t>(row_stride) * elem_size) % 16 == 0);
}

namespace gg {

// ---- deterministic reductions -------------------------------------------------------------------------
// Block sum of two values (fixed shuffle tree, then warp 0 over the warp sums); result valid in thread 0.
template <typename TC>
__device__ __forceinline__ void block_sum2(TC& s1, TC& s2) {
  __shared__ TC sh[2][kWarps];
  for (int o = 16; o > 0; o >>= 1) {
    s1 = add(s1, __shfl_down_sync(kFull, s1, o));
    s2 = add(s2, __shfl_down_sync(kFull, s2, o));
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    sh[0][warp] = s1;
    sh[1][warp] = s2;
  }
  __syncthreads();
  if (warp == 0) {
    s1 = lane < kWarps ? sh[0][lane] : TC(0);
    s2 = lane < kWarps ? sh[1][lane] : TC(0);
    for (int o = 16; o > 0; o >>= 1) {
      s1 = add(s1, __shfl_down_sync(kFull, s1, o));
      s2 = add(s2, __shfl_down_sync(kFull, s2, o));
    }
  }
}

// *p; kCg: loaded through L2 only (__ldcg), for values another block of the same launch wrote (see last_of).
template <bool kCg, typename TC>
__device__ __forceinline__ TC ld(const TC* p) {
  if (kCg) return __ldcg(p);
  return *p;
}

// Sum of one sample's n partials by a full warp, in a fixed order; every lane gets the same bits
// (the xor butterfly adds the same two numbers on both partner lanes, and addition commutes). kCg: the partials
// were written by other blocks of this launch (the single-launch forward).
template <typename TC, bool kCg = false>
__device__ __forceinline__ TC warp_sum_partials(const TC* p, int n) {
  const int lane = threadIdx.x & 31;
  TC acc = TC(0);
  for (int j = lane; j < n; j += 32) acc = add(acc, ld<kCg>(p + j));
  for (int o = 16; o > 0; o >>= 1) acc = add(acc, __shfl_xor_sync(kFull, acc, o));
  return acc;
}

// ---- single-launch forward (flags bit 2, gg_kernels.h) -------------------------------------------------
// Every block of a group (a sample's chunks; the samples of a batch) calls this, with all its threads, after its
// thread 0 has written what the group's finish reads. True, in every thread, in exactly one block of the n that
// call it on the int32 counter at cnt: the last to arrive, which then sees every such write of the others (each
// writer fences before its ticket; the winner fences after its own, and reads the others' values with ld<true>).
// The winner's thread 0 sets the counter back to 0, so the buffer is zero again for the next launch in stream
// order (the binding gives each CUDA-graph capture its own zeroed counters).
__device__ __forceinline__ bool last_of(int* cnt, int n) {
  __shared__ int is_last;
  __syncthreads();  // every thread has read is_last of a previous call, and thread 0's writes precede its fence
  if (threadIdx.x == 0) {
    __threadfence();
    is_last = atomicAdd(cnt, 1) == n - 1;
    if (is_last) {
      __threadfence();
      *cnt = 0;
    }
  }
  __syncthreads();
  return is_last != 0;
}

}  // namespace gg

// A kernel launch, `GG_LAUNCH(kernel, grid, block, stream)(args...)`: `kernel<<<grid, block, 0, stream>>>(args...)`.
// tests/cuda_emu defines it first, to run the same kernels on the CPU.
#ifndef GG_LAUNCH
#define GG_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#endif

// Dispatch a storage dtype code to a template body with `scalar_t` bound.
#define GG_DISPATCH(code, ...)                                                      \
  switch (code) {                                                                   \
    case GG_F32: { using scalar_t = float; __VA_ARGS__; break; }                    \
    case GG_F64: { using scalar_t = double; __VA_ARGS__; break; }                   \
    case GG_F16: { using scalar_t = __half; __VA_ARGS__; break; }                   \
    case GG_BF16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; }           \
    default: return cudaErrorInvalidValue;                                          \
  }
