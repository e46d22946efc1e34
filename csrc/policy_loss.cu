// policy_loss: the clipped policy loss of one trained timestep (SPEC §4-6; reference.policy_loss).
//
// Kernel 1, per (sample, chunk): partial sums of
//   GG_OLD_MEAN / GG_OLD_V:  S1 = sum u*Delta,  S2 = sum Delta^2,  u = x' - mu_old,
//                            Delta = mu_theta - mu_old  (GG_OLD_V: b (v - v_old), mu_old = a x + b v_old)
//   GG_OLD_LOGP:             sum (x' - mu_theta)^2, accumulated exactly as sde_step does.
// Kernel 2 (one block): per sample the partials are summed in sde_step's fixed order, then (TC arithmetic)
//   flow/dance: log r = (S1 - S2/2)/(D s^2), bias = S2/(2 D s^2);  cps: log r = (2 S1 - S2)/D, bias = S2/D
//   mean_revised = log r + bias; ratio_norm = guard = S1/(D s);  GG_OLD_LOGP: log p_theta - old_log_prob
//   (reference.log_ratios), A = clamp(adv, +-m), r = exp(lr), r_c = exp(clamp(lr, log1p(-eps), log1p(eps))),
//   loss = mean_i w_i max(-A r, -A r_c), stats, and the per-sample backward coefficients
//   dloss/dv_k = c1_i u_k + c2_i Delta_k (see loss_finalize).
// Kernel 3 (backward): grad_v = grad_loss * (c1_i u + c2_i Delta), elementwise.
// Single-launch forward (counters given, vector layout): the last block of each sample finishes it, and the last
// sample's finishing block finishes the batch (last_of), with kernel 2's code; no second launch.
#include "gg_common.cuh"

namespace gg {
namespace {

// One sample's inputs: each pointer at the sample's first element (inputs may have any batch stride).
template <typename T>
struct Rows {
  const T* v;
  const T* x;
  const T* prev;
  const typename Acc<T>::type* mu_old;
  const T* v_old;
};

template <typename T>
__device__ __forceinline__ Rows<T> rows_of(int64_t i, const T* v, const T* x, const T* prev,
                                           const typename Acc<T>::type* mu_old, const T* v_old, int64_t s_v,
                                           int64_t s_x, int64_t s_prev, int64_t s_old) {
  return {v + i * s_v, x + i * s_x, prev + i * s_prev, mu_old != nullptr ? mu_old + i * s_old : nullptr,
          v_old != nullptr ? v_old + i * s_old : nullptr};
}

// (u, Delta) of element d of a sample for GG_OLD_MEAN / GG_OLD_V; for GG_OLD_LOGP u = x' - mu_theta, Delta = 0.
template <typename T>
__device__ __forceinline__ void policy_terms(int mode, typename Acc<T>::type a, typename Acc<T>::type b,
                                             const Rows<T>& r, int64_t d, typename Acc<T>::type& u,
                                             typename Acc<T>::type& delta) {
  using TC = typename Acc<T>::type;
  const TC xv = load(r.x + d), vv = load(r.v + d), xp = load(r.prev + d);
  if (mode == GG_OLD_LOGP) {
    u = sub(xp, transition_mean(a, b, xv, vv));
    delta = TC(0);
  } else if (mode == GG_OLD_MEAN) {
    const TC mo = r.mu_old[d];
    u = sub(xp, mo);
    delta = sub(transition_mean(a, b, xv, vv), mo);
  } else {
    const TC vo = load(r.v_old + d);
    u = sub(xp, transition_mean(a, b, xv, vo));
    delta = mul(b, sub(vv, vo));
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
loss_chunks(const T* __restrict__ v, const T* __restrict__ x, const T* __restrict__ prev,
            const typename Acc<T>::type* __restrict__ mu_old, const T* __restrict__ v_old, int mode,
            typename Acc<T>::type* __restrict__ partial, int64_t D, int nchunks, gg_schedule sched, int64_t s_v,
            int64_t s_x, int64_t s_prev, int64_t s_old) {
  using TC = typename Acc<T>::type;
  const ChunkPos pos = chunk_pos(nchunks);
  const Coef c = step_coef(sched, pos.sample);
  const TC a = static_cast<TC>(c.a), b = static_cast<TC>(c.b);
  const Rows<T> r = rows_of(pos.sample, v, x, prev, mu_old, v_old, s_v, s_x, s_prev, s_old);
  TC s1 = TC(0), s2 = TC(0);
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t d = elem_in_sample(pos.chunk, k);
    if (d < D) {
      TC u, delta;
      policy_terms<T>(mode, a, b, r, d, u, delta);
      if (mode == GG_OLD_LOGP) {
        s1 = fma(u, u, s1);  // = sde_forward_chunks' accumulation of (x'-mu)^2
      } else {
        s1 = fma(u, delta, s1);
        s2 = fma(delta, delta, s2);
      }
    }
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    TC* out = partial + pos.sample * 2 * nchunks;
    out[pos.chunk] = s1;
    out[nchunks + pos.chunk] = s2;
  }
}

// (u, Delta) of a thread's kItems elements in the vector layout (gg_kernels.h, vec = 1): policy_terms element by
// element, the inputs moved in 16-byte accesses where every row is aligned.
template <typename T>
__device__ __forceinline__ void policy_terms_vec(int mode, typename Acc<T>::type a, typename Acc<T>::type b,
                                                 const Rows<T>& r, int64_t first, int n, bool wide,
                                                 typename Acc<T>::type (&u)[kItems],
                                                 typename Acc<T>::type (&delta)[kItems]) {
  using TC = typename Acc<T>::type;
  TC xv[kItems], vv[kItems], xp[kItems];
  load_items(r.x + first, n, wide, xv);
  load_items(r.v + first, n, wide, vv);
  load_items(r.prev + first, n, wide, xp);
  if (mode == GG_OLD_LOGP) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      u[j] = sub(xp[j], transition_mean(a, b, xv[j], vv[j]));
      delta[j] = TC(0);
    }
  } else if (mode == GG_OLD_MEAN) {
    TC mo[kItems];
    load_items(r.mu_old + first, n, wide, mo);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      u[j] = sub(xp[j], mo[j]);
      delta[j] = sub(transition_mean(a, b, xv[j], vv[j]), mo[j]);
    }
  } else {
    TC vo[kItems];
    load_items(r.v_old + first, n, wide, vo);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      u[j] = sub(xp[j], transition_mean(a, b, xv[j], vo[j]));
      delta[j] = mul(b, sub(vv[j], vo[j]));
    }
  }
}

template <typename TC>
struct LossOut;  // the forward's outputs and its per-sample work buffer (below)

template <typename TC, bool kCg>
__device__ void finish_sample(int64_t i, const TC* partial, int nchunks, int64_t B, int64_t D,
                              const gg_schedule& sched, const gg_loss_config& cfg, const LossOut<TC>& o);
template <typename TC, bool kCg>
__device__ void finish_batch(int64_t B, const gg_schedule& sched, const gg_loss_config& cfg, const LossOut<TC>& o);

// Kernel 1 in the vector layout. kFused (cnt: B + 1 zeros): the single-launch forward, the last block of each sample
// finishes it and the block that finishes the last sample finishes the batch (kernel 2's code, no second launch).
template <typename T, bool kFused>
__global__ void __launch_bounds__(kBlock)
loss_chunks_vec(const T* __restrict__ v, const T* __restrict__ x, const T* __restrict__ prev,
                const typename Acc<T>::type* __restrict__ mu_old, const T* __restrict__ v_old, int mode,
                typename Acc<T>::type* __restrict__ partial, int64_t D, int nchunks, gg_schedule sched, int64_t s_v,
                int64_t s_x, int64_t s_prev, int64_t s_old, bool wide, int* __restrict__ cnt, int64_t B,
                gg_loss_config cfg, LossOut<typename Acc<T>::type> o) {
  using TC = typename Acc<T>::type;
  const VecPos pos = vec_pos(nchunks, D);
  const int64_t first = pos.first;
  const int n = pos.n;
  TC s1 = TC(0), s2 = TC(0);
  if (n > 0) {
    const Coef c = step_coef(sched, pos.sample);
    const TC a = static_cast<TC>(c.a), b = static_cast<TC>(c.b);
    const Rows<T> r = rows_of(pos.sample, v, x, prev, mu_old, v_old, s_v, s_x, s_prev, s_old);
    TC u[kItems], delta[kItems];
    policy_terms_vec<T>(mode, a, b, r, first, n, wide, u, delta);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (j < n) {
        if (mode == GG_OLD_LOGP) {
          s1 = fma(u[j], u[j], s1);  // = sde_forward_chunks_vec's accumulation of (x'-mu)^2
        } else {
          s1 = fma(u[j], delta[j], s1);
          s2 = fma(delta[j], delta[j], s2);
        }
      }
    }
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    TC* out = partial + pos.sample * 2 * nchunks;
    out[pos.chunk] = s1;
    out[nchunks + pos.chunk] = s2;
  }
  if (kFused && last_of(cnt + pos.sample, nchunks)) {  // the single-launch forward: finish the sample ...
    if (threadIdx.x < 32) finish_sample<TC, true>(pos.sample, partial, nchunks, B, D, sched, cfg, o);
    if (last_of(cnt + B, static_cast<int>(B)) && threadIdx.x == 0) finish_batch<TC, true>(B, sched, cfg, o);  // batch
  }
}

// One sample of kernel 2 (run by one thread): log-ratio, bias, surrogate, and the backward coefficients
// dloss/dv_k = c1 u_k + c2 Delta_k. work: r - 1 (B), clipped / dppo's masked (B), per-sample loss (B), dppo's K (B).
template <typename TC>
__device__ void finalize_sample(int64_t i, TC s1, TC s2, int64_t D, int64_t B, const gg_schedule& sched,
                                const gg_loss_config& cfg, const TC* adv, const TC* old_logp, TC* log_ratio,
                                TC* bias, TC* coefs, TC* work) {
  const bool cps = sched.dynamics == GG_CPS;
  const Coef c = step_coef(sched, i);
  const TC Dt = static_cast<TC>(D), s = static_cast<TC>(c.std), b = static_cast<TC>(c.b), var = s * s;
  // log-ratio lr and its derivative d lr / d v_k = k1 u_k + k2 Delta_k
  TC lr, k1, k2 = TC(0);
  const TC k_plain = cps ? TC(2) * b / Dt : b / (Dt * var);
  if (cfg.old_mode == GG_OLD_LOGP) {
    const TC olp = (sched.check && isinf(old_logp[i])) ? TC(NAN) : old_logp[i];
    lr = log_prob_from_sum(s1, D, s, sched.dynamics) - olp;  // = sde_step's log p on-policy
    k1 = k_plain;
  } else {
    const TC m1 = s1 / Dt, m2 = s2 / Dt;
    const TC plain = cps ? TC(2) * m1 - m2 : (m1 - TC(0.5) * m2) / var;
    const TC bi = cps ? m2 : m2 / (TC(2) * var);
    bias[i] = bi;
    if (cfg.method == GG_GRPO || cfg.method == GG_DPPO) {
      lr = plain;
      k1 = k_plain;
      k2 = -k_plain;
    } else if (cfg.method == GG_MEAN_REVISED) {
      lr = plain + bi;
      k1 = k_plain;
    } else {  // ratio_norm, guard: mean_D[z Delta]
      lr = m1 / s;
      k1 = b / (Dt * s);
    }
  }
  log_ratio[i] = lr;
  // reference.clipped_surrogate and its derivative in lr as torch autograd gives it: maximum() splits a
  // tie evenly between its arguments, clamp() passes the gradient on [lo, hi] only
  const TC lo = static_cast<TC>(cfg.clip_lo), hi = static_cast<TC>(cfg.clip_hi);
  const TC m = static_cast<TC>(cfg.adv_clip_max);
  // torch.clamp and torch.maximum keep NaN; fmin/fmax would drop it (a NaN advantage or log-ratio must give a
  // NaN loss, never a finite one)
  // with the device-side checks a non-finite advantage is NaN (the clamp would make inf finite)
  const TC A = (isnan(adv[i]) || (sched.check && isinf(adv[i]))) ? TC(NAN) : fmin(fmax(adv[i], -m), m);
  const TC r = exp_(lr), rc = exp_(fmin(fmax(lr, lo), hi));
  const TC cand = -A * r, cand_c = -A * rc;
  work[i] = expm1_(lr);  // r - 1 without float32's 6e-8 resolution near 1 (reference.summarize)
  if (cfg.method == GG_DPPO) {
    // reference.masked_surrogate: no clipping, no weight; a detached gate on the exact per-step KL
    // K = mean_D[Delta^2] / (2 s^2) (reference.step_kl, every dynamics) and the direction of the move
    const TC kl = (cfg.old_mode == GG_OLD_LOGP ? TC(0) : s2 / Dt) / (TC(2) * var);
    const bool drop = kl >= static_cast<TC>(cfg.kl_threshold) && A * lr > TC(0);
    const TC dlr = drop ? TC(0) : TC(1) / static_cast<TC>(B) * -A * r;
    coefs[2 * i] = dlr * k1;
    coefs[2 * i + 1] = dlr * k2;
    work[B + i] = drop ? TC(1) : TC(0);
    work[2 * B + i] = drop ? TC(0) : cand;
    work[3 * B + i] = kl;
    return;
  }
  double w = 1.0;  // reference.sample_weights, float64 then cast
  if (cfg.method == GG_GUARD) {
    w = 1.0 / fabs(c.dt);
    if (cfg.guard_weight == GG_WEIGHT_BETA_DT) w = w * c.beta;
  }
  const TC wt = static_cast<TC>(w);
  const TC take_r = cand > cand_c ? TC(1) : (cand == cand_c ? TC(0.5) : TC(0));
  const TC take_c = cand_c > cand ? TC(1) : (cand == cand_c ? TC(0.5) : TC(0));
  const TC inside = (lr >= lo && lr <= hi) ? TC(1) : TC(0);
  const TC dlr = wt / static_cast<TC>(B) * -A * (take_r * r + take_c * inside * rc);
  coefs[2 * i] = dlr * k1;
  coefs[2 * i + 1] = dlr * k2;
  work[B + i] = (lr > hi || lr < lo) ? TC(1) : TC(0);
  work[2 * B + i] = (isnan(cand) || isnan(cand_c) ? cand + cand_c : fmax(cand, cand_c)) * wt;
}

template <typename TC>
struct LossOut {
  const TC* adv;
  const TC* old_logp;
  TC* log_ratio;
  TC* bias;
  TC* coefs;
  TC* work;
  TC* loss;
  TC* stats;
  int* err;
};

// Sample i of kernel 2, by one full warp: its partials summed in sde_step's order (kCg: written by other blocks of
// this launch), then finalize_sample by lane 0.
template <typename TC, bool kCg>
__device__ void finish_sample(int64_t i, const TC* partial, int nchunks, int64_t B, int64_t D,
                              const gg_schedule& sched, const gg_loss_config& cfg, const LossOut<TC>& o) {
  const TC* p = partial + i * 2 * nchunks;
  const TC s1 = warp_sum_partials<TC, kCg>(p, nchunks);
  const TC s2 = cfg.old_mode == GG_OLD_LOGP ? TC(0) : warp_sum_partials<TC, kCg>(p + nchunks, nchunks);
  if ((threadIdx.x & 31) == 0)
    finalize_sample(i, s1, s2, D, B, sched, cfg, o.adv, o.old_logp, o.log_ratio, o.bias, o.coefs, o.work);
}

// The batch part of kernel 2, by one thread, in sample order: the error bits; loss = mean per-sample loss; stats =
// ratio mean, population std, clip fraction, approx KL (dppo: + reference.kl_stats). kCg: the per-sample values
// were written by other blocks of this launch.
template <typename TC, bool kCg>
__device__ void finish_batch(int64_t B, const gg_schedule& sched, const gg_loss_config& cfg, const LossOut<TC>& o) {
  const TC* adv = o.adv;
  const TC* old_logp = o.old_logp;
  const TC* log_ratio = o.log_ratio;
  const TC* work = o.work;
  TC* loss = o.loss;
  TC* stats = o.stats;
  int* err = o.err;
  if (sched.check) {  // the failed checks of the batch (gg_kernels.h)
    int bits = 0;
    for (int64_t i = 0; i < B; ++i) {
      bits |= sigma_error_bits(sched, i);
      bits |= isfinite(adv[i]) ? 0 : 8;
      if (old_logp != nullptr) bits |= isfinite(old_logp[i]) ? 0 : 16;  // checked wherever given, as requests.py
    }
    err[0] = bits << GG_ERR_POLICY_LOSS;
  }
  const TC Bt = static_cast<TC>(B);
  TC sum_loss = 0, sum_r = 0, sum_clip = 0, sum_kl = 0;
  for (int64_t i = 0; i < B; ++i) {
    const TC lr = ld<kCg>(log_ratio + i);
    sum_r += ld<kCg>(work + i);
    sum_clip += ld<kCg>(work + B + i);
    sum_loss += ld<kCg>(work + 2 * B + i);
    sum_kl += lr * lr;
  }
  const TC excess_mean = sum_r / Bt;  // ratio stats from r - 1, as reference.summarize
  TC sum_dev = 0;
  for (int64_t i = 0; i < B; ++i) {
    const TC dev = ld<kCg>(work + i) - excess_mean;
    sum_dev += dev * dev;
  }
  loss[0] = sum_loss / Bt;
  stats[0] = TC(1) + excess_mean;
  stats[1] = sqrt(sum_dev / Bt);
  stats[2] = sum_clip / Bt;
  stats[3] = TC(0.5) * (sum_kl / Bt);
  if (cfg.method == GG_DPPO) {  // reference.kl_stats
    TC k_sum = 0, k_max = -INFINITY, n_pos = 0, n_neg = 0, d_pos = 0, d_neg = 0;
    for (int64_t i = 0; i < B; ++i) {
      const TC k = ld<kCg>(work + 3 * B + i), dropped = ld<kCg>(work + B + i);
      k_sum += k;
      k_max = (isnan(k) || k > k_max) ? k : k_max;
      n_pos += adv[i] > TC(0) ? TC(1) : TC(0);
      n_neg += adv[i] < TC(0) ? TC(1) : TC(0);
      d_pos += adv[i] > TC(0) ? dropped : TC(0);
      d_neg += adv[i] < TC(0) ? dropped : TC(0);
    }
    stats[4] = k_sum / Bt;
    stats[5] = k_max;
    stats[6] = sum_clip / Bt;
    stats[7] = d_pos / fmax(n_pos, TC(1));
    stats[8] = d_neg / fmax(n_neg, TC(1));
  }
}

// Kernel 2, one block: warps take samples (sums in sde_step's order), then thread 0 finishes the batch.
template <typename TC>
__global__ void __launch_bounds__(kBlock)
loss_finalize(const TC* __restrict__ partial, int nchunks, int64_t B, int64_t D, gg_schedule sched,
              gg_loss_config cfg, LossOut<TC> o) {
  for (int64_t i = threadIdx.x >> 5; i < B; i += kWarps) finish_sample<TC, false>(i, partial, nchunks, B, D, sched,
                                                                                   cfg, o);
  __syncthreads();
  if (threadIdx.x == 0) finish_batch<TC, false>(B, sched, cfg, o);
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
loss_backward_kernel(const T* __restrict__ v, const T* __restrict__ x, const T* __restrict__ prev,
                     const typename Acc<T>::type* __restrict__ mu_old, const T* __restrict__ v_old, int mode,
                     const typename Acc<T>::type* __restrict__ coefs,
                     const typename Acc<T>::type* __restrict__ grad_loss, T* __restrict__ grad_v, int64_t D,
                     int nchunks, gg_schedule sched, int64_t s_v, int64_t s_x, int64_t s_prev, int64_t s_old) {
  using TC = typename Acc<T>::type;
  const ChunkPos pos = chunk_pos(nchunks);
  const Coef c = step_coef(sched, pos.sample);
  const TC a = static_cast<TC>(c.a), b = static_cast<TC>(c.b);
  const TC g = grad_loss[0];
  const TC c1 = g * coefs[2 * pos.sample], c2 = g * coefs[2 * pos.sample + 1];
  const int64_t base = pos.sample * D;  // grad_v is contiguous
  const Rows<T> r = rows_of(pos.sample, v, x, prev, mu_old, v_old, s_v, s_x, s_prev, s_old);
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t d = elem_in_sample(pos.chunk, k);
    if (d < D) {
      TC u, delta;
      policy_terms<T>(mode, a, b, r, d, u, delta);
      store(grad_v + base + d, c1 * u + c2 * delta);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
loss_backward_kernel_vec(const T* __restrict__ v, const T* __restrict__ x, const T* __restrict__ prev,
                         const typename Acc<T>::type* __restrict__ mu_old, const T* __restrict__ v_old, int mode,
                         const typename Acc<T>::type* __restrict__ coefs,
                         const typename Acc<T>::type* __restrict__ grad_loss, T* __restrict__ grad_v, int64_t D,
                         int nchunks, gg_schedule sched, int64_t s_v, int64_t s_x, int64_t s_prev, int64_t s_old,
                         bool wide) {
  using TC = typename Acc<T>::type;
  const VecPos pos = vec_pos(nchunks, D);
  const int64_t first = pos.first;
  const int n = pos.n;
  if (n == 0) return;
  const Coef c = step_coef(sched, pos.sample);
  const TC a = static_cast<TC>(c.a), b = static_cast<TC>(c.b);
  const TC g = grad_loss[0];
  const TC c1 = g * coefs[2 * pos.sample], c2 = g * coefs[2 * pos.sample + 1];
  const Rows<T> r = rows_of(pos.sample, v, x, prev, mu_old, v_old, s_v, s_x, s_prev, s_old);
  TC u[kItems], delta[kItems], out[kItems];
  policy_terms_vec<T>(mode, a, b, r, first, n, wide, u, delta);
#pragma unroll
  for (int j = 0; j < kItems; ++j) out[j] = c1 * u[j] + c2 * delta[j];
  store_items(grad_v + pos.sample * D + first, n, wide, out);  // grad_v is contiguous
}

// Every row of the call's latent arrays 16-byte aligned (the vector layout's wide accesses).
template <typename T, typename Args>
bool loss_rows_aligned(const Args* p) {
  using TC = typename Acc<T>::type;
  return gg_rows_aligned(p->v, p->s_v, sizeof(T)) && gg_rows_aligned(p->x, p->s_x, sizeof(T)) &&
         gg_rows_aligned(p->prev, p->s_prev, sizeof(T)) && gg_rows_aligned(p->mu_old, p->s_old, sizeof(TC)) &&
         gg_rows_aligned(p->v_old, p->s_old, sizeof(T));
}

}  // namespace
}  // namespace gg

extern "C" cudaError_t gg_loss_forward(const gg_loss_fwd_args* p, const gg_schedule* sched,
                                       const gg_loss_config* cfg, cudaStream_t stream) {
  using namespace gg;
  const int nchunks = static_cast<int>(gg_num_chunks(p->D));
  const unsigned int grid = static_cast<unsigned int>(p->B * nchunks);
  GG_DISPATCH(p->dtype, {
    using TC = typename Acc<scalar_t>::type;
    const LossOut<TC> out{static_cast<const TC*>(p->adv), static_cast<const TC*>(p->old_logp),
                          static_cast<TC*>(p->log_ratio), static_cast<TC*>(p->bias), static_cast<TC*>(p->coefs),
                          static_cast<TC*>(p->work), static_cast<TC*>(p->loss), static_cast<TC*>(p->stats),
                          static_cast<int*>(p->err)};
    if (p->vec) {
      const auto kernel = p->counters != nullptr ? loss_chunks_vec<scalar_t, true> : loss_chunks_vec<scalar_t, false>;
      GG_LAUNCH(kernel, grid, kBlock, stream)(
          static_cast<const scalar_t*>(p->v), static_cast<const scalar_t*>(p->x),
          static_cast<const scalar_t*>(p->prev), static_cast<const TC*>(p->mu_old),
          static_cast<const scalar_t*>(p->v_old), cfg->old_mode, static_cast<TC*>(p->partial), p->D, nchunks, *sched,
          p->s_v, p->s_x, p->s_prev, p->s_old, loss_rows_aligned<scalar_t>(p), static_cast<int*>(p->counters), p->B,
          *cfg, out);
      if (p->counters != nullptr) return cudaGetLastError();  // finished in the same launch
    } else {
      if (p->counters != nullptr) return cudaErrorInvalidValue;  // the single launch needs the vector layout
      GG_LAUNCH(loss_chunks<scalar_t>, grid, kBlock, stream)(
          static_cast<const scalar_t*>(p->v), static_cast<const scalar_t*>(p->x),
          static_cast<const scalar_t*>(p->prev), static_cast<const TC*>(p->mu_old),
          static_cast<const scalar_t*>(p->v_old), cfg->old_mode, static_cast<TC*>(p->partial), p->D, nchunks, *sched,
          p->s_v, p->s_x, p->s_prev, p->s_old);
    }
    GG_LAUNCH(loss_finalize<TC>, 1, kBlock, stream)(static_cast<const TC*>(p->partial), nchunks, p->B, p->D, *sched,
                                                    *cfg, out);
  });
  return cudaGetLastError();
}

extern "C" cudaError_t gg_loss_backward(const gg_loss_bwd_args* p, const gg_schedule* sched, cudaStream_t stream) {
  using namespace gg;
  const int nchunks = static_cast<int>(gg_num_chunks(p->D));
  const unsigned int grid = static_cast<unsigned int>(p->B * nchunks);
  GG_DISPATCH(p->dtype, {
    using TC = typename Acc<scalar_t>::type;
    if (p->vec) {
      GG_LAUNCH(loss_backward_kernel_vec<scalar_t>, grid, kBlock, stream)(
          static_cast<const scalar_t*>(p->v), static_cast<const scalar_t*>(p->x),
          static_cast<const scalar_t*>(p->prev), static_cast<const TC*>(p->mu_old),
          static_cast<const scalar_t*>(p->v_old), p->old_mode, static_cast<const TC*>(p->coefs),
          static_cast<const TC*>(p->grad_loss), static_cast<scalar_t*>(p->grad_v), p->D, nchunks, *sched, p->s_v,
          p->s_x, p->s_prev, p->s_old,
          loss_rows_aligned<scalar_t>(p) && gg_rows_aligned(p->grad_v, p->D, sizeof(scalar_t)));
    } else {
      GG_LAUNCH(loss_backward_kernel<scalar_t>, grid, kBlock, stream)(
          static_cast<const scalar_t*>(p->v), static_cast<const scalar_t*>(p->x),
          static_cast<const scalar_t*>(p->prev), static_cast<const TC*>(p->mu_old),
          static_cast<const scalar_t*>(p->v_old), p->old_mode, static_cast<const TC*>(p->coefs),
          static_cast<const TC*>(p->grad_loss), static_cast<scalar_t*>(p->grad_v), p->D, nchunks, *sched, p->s_v,
          p->s_x, p->s_prev, p->s_old);
    }
  });
  return cudaGetLastError();
}
