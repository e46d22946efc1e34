// sde_step: one SDE step and its log-probability (SPEC §2; reference.sde_step), forward and backward.
//
// Per sample i, over its D latent elements (flat (B, D)):
//   mu = a x + b v;  rollout: x' = round_T(mu + s z);  log p_i = mean_D[-(x'-mu)^2/(2 s^2)] - log s - log sqrt(2 pi)
//   (cps: -mean_D[(x'-mu)^2]). Forward = chunk kernel (mu, x', partial sums of (x'-mu)^2) + finalize kernel, or
//   (counters given, vector layout) one launch: the last block of each sample finishes it (last_of).
//   Backward (x' a constant in log p):  g_mu = g_mean + g_prev + g_logp_i * dlogp/dmu,
//   dlogp/dmu = (x'-mu)/(D s^2) (cps: 2(x'-mu)/D);  grad_v = b g_mu, grad_x = a g_mu.
#include "gg_common.cuh"

namespace gg {
namespace {

template <typename T>
__global__ void __launch_bounds__(kBlock)
sde_forward_chunks(const T* __restrict__ v, const T* __restrict__ x, const T* __restrict__ prev_in,
                   const typename Acc<T>::type* __restrict__ noise, T* __restrict__ prev_out,
                   typename Acc<T>::type* __restrict__ mean, typename Acc<T>::type* __restrict__ partial,
                   int64_t D, int nchunks, gg_schedule sched, int round_mode, int64_t s_v, int64_t s_x,
                   int64_t s_prev, int64_t s_noise) {
  using TC = typename Acc<T>::type;
  const ChunkPos pos = chunk_pos(nchunks);
  const Coef c = step_coef(sched, pos.sample);
  const TC a = static_cast<TC>(c.a), b = static_cast<TC>(c.b), s = static_cast<TC>(c.std);
  const int64_t base = pos.sample * D;  // outputs; inputs start at sample * their batch stride
  const T* vr = v + pos.sample * s_v;
  const T* xr = x + pos.sample * s_x;
  TC acc = TC(0), unused = TC(0);
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t d = elem_in_sample(pos.chunk, k);
    if (d < D) {
      const int64_t e = base + d;
      const TC mu = transition_mean(a, b, load(xr + d), load(vr + d));
      mean[e] = mu;
      TC xp;
      if (prev_in != nullptr) {
        xp = load(prev_in + pos.sample * s_prev + d);
      } else {  // log p is that of the stored (rounded) x'
        xp = rounded<T>(add(mu, mul(s, noise[pos.sample * s_noise + d])));
        if (round_mode == GG_ROUND_BF16) xp = rounded<__nv_bfloat16>(xp);
        if (round_mode == GG_ROUND_F16) xp = rounded<__half>(xp);
        store(prev_out + e, xp);
      }
      const TC diff = sub(xp, mu);
      acc = fma(diff, diff, acc);  // must match loss_chunks' GG_OLD_LOGP accumulation exactly
    }
  }
  block_sum2(acc, unused);
  if (threadIdx.x == 0) partial[pos.sample * nchunks + pos.chunk] = acc;
}

// The failed sigma checks of the batch as the error word's sde_step bits (gg_kernels.h), by one thread.
__device__ __forceinline__ int sde_error_bits(const gg_schedule& sched, int64_t B) {
  int bits = 0;
  for (int64_t i = 0; i < B; ++i) bits |= sigma_error_bits(sched, i) & 3;
  return bits << GG_ERR_SDE_STEP;
}

// log_prob[i] and std_dev_t[i] from sample i's partials, by one full warp (kCg: partials of other blocks).
template <typename TC, bool kCg>
__device__ __forceinline__ void sde_finish_sample(int64_t i, const TC* partial, int nchunks, int64_t D,
                                                  const gg_schedule& sched, TC* log_prob, TC* std_dev_t) {
  const TC sum = warp_sum_partials<TC, kCg>(partial + i * nchunks, nchunks);
  if ((threadIdx.x & 31) == 0) {
    const Coef c = step_coef(sched, i);
    log_prob[i] = log_prob_from_sum(sum, D, static_cast<TC>(c.std), sched.dynamics);
    std_dev_t[i] = static_cast<TC>(c.std_dev_t);
  }
}

// The vector layout (gg_kernels.h, vec = 1): the same per-element arithmetic in the same order per thread; mean is
// written only when asked for (a rollout that keeps x' and log p skips a latent-sized TC write). kFused (cnt: B zeros):
// the single-launch forward, the last block of each sample finishes it (and block 0 writes the error bits).
template <typename T, bool kFused>
__global__ void __launch_bounds__(kBlock)
sde_forward_chunks_vec(const T* __restrict__ v, const T* __restrict__ x, const T* __restrict__ prev_in,
                       const typename Acc<T>::type* __restrict__ noise, T* __restrict__ prev_out,
                       typename Acc<T>::type* __restrict__ mean, typename Acc<T>::type* __restrict__ partial,
                       int64_t D, int nchunks, gg_schedule sched, int round_mode, int64_t s_v, int64_t s_x,
                       int64_t s_prev, int64_t s_noise, bool wide, int* __restrict__ cnt, int64_t B,
                       typename Acc<T>::type* __restrict__ log_prob, typename Acc<T>::type* __restrict__ std_dev_t,
                       int* __restrict__ err) {
  using TC = typename Acc<T>::type;
  const VecPos pos = vec_pos(nchunks, D);
  const Coef c = step_coef(sched, pos.sample);
  const TC a = static_cast<TC>(c.a), b = static_cast<TC>(c.b), s = static_cast<TC>(c.std);
  const int64_t first = pos.first;
  const int n = pos.n;
  TC acc = TC(0), unused = TC(0);
  if (n > 0) {
    const int64_t e = pos.sample * D + first;  // outputs; inputs start at sample * their batch stride
    TC xv[kItems], vv[kItems], mu[kItems], xp[kItems];
    load_items(x + pos.sample * s_x + first, n, wide, xv);
    load_items(v + pos.sample * s_v + first, n, wide, vv);
#pragma unroll
    for (int j = 0; j < kItems; ++j) mu[j] = transition_mean(a, b, xv[j], vv[j]);
    if (mean != nullptr) store_items(mean + e, n, wide, mu);
    if (prev_in != nullptr) {
      load_items(prev_in + pos.sample * s_prev + first, n, wide, xp);
    } else {  // log p is that of the stored (rounded) x'
      load_items(noise + pos.sample * s_noise + first, n, wide, xp);
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        xp[j] = rounded<T>(add(mu[j], mul(s, xp[j])));
        if (round_mode == GG_ROUND_BF16) xp[j] = rounded<__nv_bfloat16>(xp[j]);
        if (round_mode == GG_ROUND_F16) xp[j] = rounded<__half>(xp[j]);
      }
      store_items(prev_out + e, n, wide, xp);
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (j < n) {
        const TC diff = sub(xp[j], mu[j]);
        acc = fma(diff, diff, acc);  // must match loss_chunks_vec's GG_OLD_LOGP accumulation exactly
      }
    }
  }
  block_sum2(acc, unused);
  if (threadIdx.x == 0) partial[pos.sample * nchunks + pos.chunk] = acc;
  if (kFused) {  // the single-launch forward (a template flag: the two-launch kernel keeps its registers)
    if (sched.check && blockIdx.x == 0 && threadIdx.x == 0) err[0] = sde_error_bits(sched, B);
    if (last_of(cnt + pos.sample, nchunks) && threadIdx.x < 32)
      sde_finish_sample<TC, true>(pos.sample, partial, nchunks, D, sched, log_prob, std_dev_t);
  }
}

template <typename TC>
__global__ void sde_finalize(const TC* __restrict__ partial, int nchunks, int64_t B, int64_t D,
                             gg_schedule sched, TC* __restrict__ log_prob, TC* __restrict__ std_dev_t,
                             int* __restrict__ err) {
  if (sched.check && blockIdx.x == 0 && threadIdx.x == 0) err[0] = sde_error_bits(sched, B);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = warp; i < B; i += nwarps)
    sde_finish_sample<TC, false>(i, partial, nchunks, D, sched, log_prob, std_dev_t);
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
sde_backward_kernel(const typename Acc<T>::type* __restrict__ g_mean, const T* __restrict__ g_prev,
                    const typename Acc<T>::type* __restrict__ g_logp, const T* __restrict__ prev,
                    const typename Acc<T>::type* __restrict__ mean, T* __restrict__ grad_v,
                    T* __restrict__ grad_x, int64_t D, int nchunks, gg_schedule sched, int64_t s_prev) {
  using TC = typename Acc<T>::type;
  const ChunkPos pos = chunk_pos(nchunks);
  const Coef c = step_coef(sched, pos.sample);
  const TC a = static_cast<TC>(c.a), b = static_cast<TC>(c.b), s = static_cast<TC>(c.std);
  const TC dlogp = sched.dynamics == GG_CPS ? TC(2) / static_cast<TC>(D)
                                            : TC(1) / (static_cast<TC>(D) * s * s);
  const TC gl = g_logp != nullptr ? g_logp[pos.sample] * dlogp : TC(0);
  const int64_t base = pos.sample * D;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t d = elem_in_sample(pos.chunk, k);
    if (d < D) {
      const int64_t e = base + d;
      TC g = TC(0);
      if (g_mean != nullptr) g += g_mean[e];
      if (g_prev != nullptr) g += load(g_prev + e);
      if (g_logp != nullptr) g += gl * (load(prev + pos.sample * s_prev + d) - mean[e]);
      if (grad_v != nullptr) store(grad_v + e, b * g);
      if (grad_x != nullptr) store(grad_x + e, a * g);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
sde_backward_kernel_vec(const typename Acc<T>::type* __restrict__ g_mean, const T* __restrict__ g_prev,
                        const typename Acc<T>::type* __restrict__ g_logp, const T* __restrict__ prev,
                        const typename Acc<T>::type* __restrict__ mean, T* __restrict__ grad_v,
                        T* __restrict__ grad_x, int64_t D, int nchunks, gg_schedule sched, int64_t s_prev,
                        bool wide) {
  using TC = typename Acc<T>::type;
  const VecPos pos = vec_pos(nchunks, D);
  const int64_t first = pos.first;
  const int n = pos.n;
  if (n == 0) return;
  const Coef c = step_coef(sched, pos.sample);
  const TC a = static_cast<TC>(c.a), b = static_cast<TC>(c.b), s = static_cast<TC>(c.std);
  const TC dlogp = sched.dynamics == GG_CPS ? TC(2) / static_cast<TC>(D)
                                            : TC(1) / (static_cast<TC>(D) * s * s);
  const int64_t e = pos.sample * D + first;
  TC g[kItems], t[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) g[j] = TC(0);
  if (g_mean != nullptr) {
    load_items(g_mean + e, n, wide, t);
#pragma unroll
    for (int j = 0; j < kItems; ++j) g[j] += t[j];
  }
  if (g_prev != nullptr) {
    load_items(g_prev + e, n, wide, t);
#pragma unroll
    for (int j = 0; j < kItems; ++j) g[j] += t[j];
  }
  if (g_logp != nullptr) {
    const TC gl = g_logp[pos.sample] * dlogp;
    TC mu[kItems];
    load_items(prev + pos.sample * s_prev + first, n, wide, t);
    load_items(mean + e, n, wide, mu);
#pragma unroll
    for (int j = 0; j < kItems; ++j) g[j] += gl * (t[j] - mu[j]);
  }
  if (grad_v != nullptr) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) t[j] = b * g[j];
    store_items(grad_v + e, n, wide, t);
  }
  if (grad_x != nullptr) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) t[j] = a * g[j];
    store_items(grad_x + e, n, wide, t);
  }
}

unsigned int chunk_grid(int64_t B, int64_t D) { return static_cast<unsigned int>(B * gg_num_chunks(D)); }

}  // namespace
}  // namespace gg

extern "C" int64_t gg_num_chunks(int64_t D) { return (D + GG_CHUNK - 1) / GG_CHUNK; }

extern "C" cudaError_t gg_sde_forward(const gg_sde_fwd_args* p, const gg_schedule* sched, cudaStream_t stream) {
  using namespace gg;
  const int nchunks = static_cast<int>(gg_num_chunks(p->D));
  const unsigned int fin_blocks = static_cast<unsigned int>((p->B * 32 + kBlock - 1) / kBlock);
  GG_DISPATCH(p->dtype, {
    using TC = typename Acc<scalar_t>::type;
    if (p->vec) {
      const bool wide = gg_rows_aligned(p->v, p->s_v, sizeof(scalar_t)) &&
                        gg_rows_aligned(p->x, p->s_x, sizeof(scalar_t)) &&
                        gg_rows_aligned(p->prev_in, p->s_prev, sizeof(scalar_t)) &&
                        gg_rows_aligned(p->noise, p->s_noise, sizeof(TC)) &&
                        gg_rows_aligned(p->prev_out, p->D, sizeof(scalar_t)) &&
                        gg_rows_aligned(p->mean, p->D, sizeof(TC));
      const auto kernel = p->counters != nullptr ? sde_forward_chunks_vec<scalar_t, true>
                                                 : sde_forward_chunks_vec<scalar_t, false>;
      GG_LAUNCH(kernel, chunk_grid(p->B, p->D), kBlock, stream)(
          static_cast<const scalar_t*>(p->v), static_cast<const scalar_t*>(p->x),
          static_cast<const scalar_t*>(p->prev_in), static_cast<const TC*>(p->noise),
          static_cast<scalar_t*>(p->prev_out), static_cast<TC*>(p->mean), static_cast<TC*>(p->partial), p->D,
          nchunks, *sched, p->round_mode, p->s_v, p->s_x, p->s_prev, p->s_noise, wide,
          static_cast<int*>(p->counters), p->B, static_cast<TC*>(p->log_prob), static_cast<TC*>(p->std_dev_t),
          static_cast<int*>(p->err));
      if (p->counters != nullptr) return cudaGetLastError();  // finished in the same launch
    } else {
      if (p->counters != nullptr) return cudaErrorInvalidValue;  // the single launch needs the vector layout
      GG_LAUNCH(sde_forward_chunks<scalar_t>, chunk_grid(p->B, p->D), kBlock, stream)(
          static_cast<const scalar_t*>(p->v), static_cast<const scalar_t*>(p->x),
          static_cast<const scalar_t*>(p->prev_in), static_cast<const TC*>(p->noise),
          static_cast<scalar_t*>(p->prev_out), static_cast<TC*>(p->mean), static_cast<TC*>(p->partial), p->D,
          nchunks, *sched, p->round_mode, p->s_v, p->s_x, p->s_prev, p->s_noise);
    }
    GG_LAUNCH(sde_finalize<TC>, fin_blocks, kBlock, stream)(
        static_cast<const TC*>(p->partial), nchunks, p->B, p->D, *sched, static_cast<TC*>(p->log_prob),
        static_cast<TC*>(p->std_dev_t), static_cast<int*>(p->err));
  });
  return cudaGetLastError();
}

extern "C" cudaError_t gg_sde_backward(const gg_sde_bwd_args* p, const gg_schedule* sched, cudaStream_t stream) {
  using namespace gg;
  const int nchunks = static_cast<int>(gg_num_chunks(p->D));
  GG_DISPATCH(p->dtype, {
    using TC = typename Acc<scalar_t>::type;
    if (p->vec) {
      const bool wide = gg_rows_aligned(p->g_mean, p->D, sizeof(TC)) &&
                        gg_rows_aligned(p->g_prev, p->D, sizeof(scalar_t)) &&
                        gg_rows_aligned(p->prev, p->s_prev, sizeof(scalar_t)) &&
                        gg_rows_aligned(p->mean, p->D, sizeof(TC)) &&
                        gg_rows_aligned(p->grad_v, p->D, sizeof(scalar_t)) &&
                        gg_rows_aligned(p->grad_x, p->D, sizeof(scalar_t));
      GG_LAUNCH(sde_backward_kernel_vec<scalar_t>, chunk_grid(p->B, p->D), kBlock, stream)(
          static_cast<const TC*>(p->g_mean), static_cast<const scalar_t*>(p->g_prev),
          static_cast<const TC*>(p->g_logp), static_cast<const scalar_t*>(p->prev), static_cast<const TC*>(p->mean),
          static_cast<scalar_t*>(p->grad_v), static_cast<scalar_t*>(p->grad_x), p->D, nchunks, *sched, p->s_prev,
          wide);
    } else {
      GG_LAUNCH(sde_backward_kernel<scalar_t>, chunk_grid(p->B, p->D), kBlock, stream)(
          static_cast<const TC*>(p->g_mean), static_cast<const scalar_t*>(p->g_prev),
          static_cast<const TC*>(p->g_logp), static_cast<const scalar_t*>(p->prev), static_cast<const TC*>(p->mean),
          static_cast<scalar_t*>(p->grad_v), static_cast<scalar_t*>(p->grad_x), p->D, nchunks, *sched, p->s_prev);
    }
  });
  return cudaGetLastError();
}
