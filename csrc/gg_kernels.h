/* grpo_guard CUDA kernels: the C launcher API (no torch). Formulas: grpo_guard/reference.py, SPEC.md §2-6.
 *
 * Every latent tensor is a (B, D) array whose rows (samples) are contiguous; latent *inputs* may have any stride
 * over the batch dim (the s_* fields, in elements: a [:, k] slice of a (B, T, ...) trajectory tensor is read in
 * place), outputs and gradients are contiguous (row stride D). Storage dtype T (one of GG_F32/F64/F16/BF16) is
 * shared by the latent inputs of a call; the compute dtype TC is double for T = double, float otherwise
 * (per-sample outputs, means, partial sums and gradients of TC-typed outputs are TC).
 *
 * Reductions are deterministic and atomic-free: block (i, c) of the first kernel reduces chunk c
 * (GG_CHUNK elements) of sample i into partial[i][c]; a second kernel sums the partials of each sample in
 * a fixed order. sde_step and policy_loss use the same chunking and the same summation code, so the
 * on-policy log-prob (and the log-ratio) are bit-identical.
 */
#ifndef GRPO_GUARD_KERNELS_H
#define GRPO_GUARD_KERNELS_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#define GG_BLOCK 256                     /* threads per block of the chunk kernels */
#define GG_ITEMS 8                       /* elements per thread and chunk */
#define GG_CHUNK (GG_BLOCK * GG_ITEMS)   /* elements of one (sample, chunk) partial sum */

#ifdef __cplusplus
extern "C" {
#endif

enum { GG_F32 = 0, GG_F64 = 1, GG_F16 = 2, GG_BF16 = 3 };                 /* storage dtypes */
enum { GG_FLOW = 0, GG_DANCE = 1, GG_CPS = 2 };                           /* reference.DYNAMICS */
enum { GG_GRPO = 0, GG_MEAN_REVISED = 1, GG_RATIO_NORM = 2, GG_GUARD = 3, GG_DPPO = 4 }; /* reference.METHODS */
enum { GG_WEIGHT_DT = 0, GG_WEIGHT_BETA_DT = 1 };                         /* reference.GUARD_WEIGHTS */
/* policy_loss: where the old policy comes from */
enum { GG_OLD_MEAN = 0,  /* old_prev_sample_mean mu_old (TC): Delta = mu_theta - mu_old          */
       GG_OLD_V = 1,     /* old_model_output v_old (T):   Delta = b (v - v_old), mu_old = a x + b v_old */
       GG_OLD_LOGP = 2   /* old_log_prob only (method grpo): log r = log p_theta - old_log_prob      */
};
/* sde_step rollout: extra rounding of x' when T = float but the sample dtype is narrower (mixed dtypes) */
enum { GG_ROUND_NONE = 0, GG_ROUND_F16 = 2, GG_ROUND_BF16 = 3 };

/* Device-side checks (check = 1; grpo_guard/ops/errors.py): a sample whose sigmas break SPEC §2 (0 < sigma <= 1,
 * 0 <= sigma_next < sigma; with refuse_zero_next also sigma_next != 0) gets NaN step coefficients, so all its
 * outputs and gradients are NaN; policy_loss also makes a non-finite advantage or old log-prob NaN. The forward's
 * finish writes the failed checks' bits (int32, `err` of the argument structs) in the error word's layout:
 * sde_step bits 0 sigma, 1 sigma_next; policy_loss bits 2 sigma, 3 sigma_next, 4 sigma_next == 0 refused,
 * 5 advantages, 6 old_log_prob. */
enum { GG_ERR_SDE_STEP = 0, GG_ERR_POLICY_LOSS = 2 };

/* The step's sigmas, per sample (device float64 arrays of length B) or shared (the *_value fields). */
typedef struct {
  const double* sigma;       /* (B,) device, or NULL: sigma_value for every sample */
  const double* sigma_next;  /* (B,) device, or NULL: sigma_next_value */
  double sigma_value, sigma_next_value;
  double eta;                /* noise_level */
  double sin_half_pi_eta;    /* sin(eta*pi/2), computed on the host as reference.step_coefficients does */
  int dynamics;              /* GG_FLOW / GG_DANCE / GG_CPS */
  int check;                 /* device-side checks (above) */
  int refuse_zero_next;      /* with check: sigma_next == 0 fails too (cps with a loss that divides by s) */
} gg_schedule;

int64_t gg_num_chunks(int64_t D);

/* Element layout of the chunk kernels (the `vec` field of the argument structs):
 *   0 (default): thread t of block (i, c) takes elements c*GG_CHUNK + k*GG_BLOCK + t, k < GG_ITEMS (one load each);
 *   1 (opt-in, GRPO_GUARD_CUDA_V2=1 until the GPU test suite has passed with it): thread t takes the GG_ITEMS
 *     contiguous elements from c*GG_CHUNK + t*GG_ITEMS, in 16-byte loads and stores where every row is 16-byte
 *     aligned. The layout fixes the order of the sums: sde_step and policy_loss must use the same one for the
 *     on-policy log-ratio from old_log_prob to be exactly 0. */

/* Single-launch forwards (`counters` given; opt-in with the vector layout): the chunk kernel's blocks take a ticket
 * on their sample's counter once their partial is written, and the last of a sample's blocks sums its partials (in
 * the same fixed order as the finalize kernel: the same bits) and finishes the sample; policy_loss's last sample
 * then takes a ticket on counters[B] and finishes the batch. No second launch. The counters are zero at launch and
 * zero again after it (the winners reset them), so one buffer serves every launch of a stream. */

/* sde_step forward. Rollout: prev_in NULL, noise (TC) given, prev_out (T) written with x' = mu + s*noise
 * rounded to T (and round_mode). Training: prev_in (T) given. Writes log_prob and std_dev_t (TC, (B,)) and,
 * unless mean is NULL, mean (TC, (B, D)). partial: TC scratch of B * gg_num_chunks(D). */
typedef struct {
  int dtype; int round_mode; int vec; int64_t B, D;
  const void* v; const void* x; const void* prev_in; const void* noise;
  void* prev_out; void* mean; void* log_prob; void* std_dev_t; void* partial;
  void* err;                          /* int32 (1,): the failed checks' bits, written iff sched->check */
  int64_t s_v, s_x, s_prev, s_noise;  /* batch strides of the inputs (elements) */
  void* counters;                     /* NULL, or (vec = 1) int32 of >= B zeros: single launch (below) */
} gg_sde_fwd_args;
cudaError_t gg_sde_forward(const gg_sde_fwd_args* args, const gg_schedule* sched, cudaStream_t stream);

/* sde_step backward: g = g_mean + g_prev + g_logp_i * dlogp/dmu (any of the three may be NULL);
 * grad_v = b*g, grad_x = a*g (T; either may be NULL). prev (T) and mean (TC) are needed iff g_logp. */
typedef struct {
  int dtype; int vec; int64_t B, D;
  const void* g_mean; const void* g_prev; const void* g_logp; const void* prev; const void* mean;
  void* grad_v; void* grad_x;
  int64_t s_prev;  /* batch stride of prev (elements); g_mean, g_prev, mean are contiguous */
} gg_sde_bwd_args;
cudaError_t gg_sde_backward(const gg_sde_bwd_args* args, const gg_schedule* sched, cudaStream_t stream);

typedef struct {
  int method; int old_mode; int guard_weight;
  double clip_lo, clip_hi;   /* log1p(-eps), log1p(eps) */
  double adv_clip_max;
  double kl_threshold;       /* GG_DPPO: a sample is dropped when K >= kl_threshold and A log r > 0 */
} gg_loss_config;

/* policy_loss forward. Inputs v, x, prev (T), mu_old (TC, GG_OLD_MEAN) or v_old (T, GG_OLD_V); adv and
 * old_logp (TC, (B,)). Outputs (TC): loss (1), stats (4: ratio_mean, ratio_std, clipfrac, approx_kl; GG_DPPO 9:
 * + kl_mean, kl_max, masked_fraction, masked fraction among A > 0, among A < 0), log_ratio (B), bias (B, NULL
 * for GG_OLD_LOGP), coefs (B, 2: per-sample backward coefficients).
 * Scratch (TC): partial (B * 2 * gg_num_chunks(D)), work (4B). */
typedef struct {
  int dtype; int vec; int64_t B, D;
  const void* v; const void* x; const void* prev; const void* mu_old; const void* v_old;
  const void* adv; const void* old_logp;
  void* loss; void* stats; void* log_ratio; void* bias; void* coefs; void* partial; void* work;
  void* err;                        /* int32 (1,): the failed checks' bits, written iff sched->check */
  int64_t s_v, s_x, s_prev, s_old;  /* batch strides of v, x, prev and of mu_old / v_old (elements) */
  void* counters;                   /* NULL, or (vec = 1) int32 of >= B + 1 zeros: single launch (below) */
} gg_loss_fwd_args;
cudaError_t gg_loss_forward(const gg_loss_fwd_args* args, const gg_schedule* sched, const gg_loss_config* cfg,
                            cudaStream_t stream);

/* policy_loss backward: grad_v = grad_loss * (coefs[i,0] * u + coefs[i,1] * Delta), u = x' - mu_old
 * (GG_OLD_LOGP: u = x' - mu_theta, Delta unused). grad_loss: device pointer to one TC. */
typedef struct {
  int dtype; int old_mode; int vec; int64_t B, D;
  const void* v; const void* x; const void* prev; const void* mu_old; const void* v_old;
  const void* coefs; const void* grad_loss; void* grad_v;
  int64_t s_v, s_x, s_prev, s_old;  /* batch strides of the inputs (elements); grad_v is contiguous */
} gg_loss_bwd_args;
cudaError_t gg_loss_backward(const gg_loss_bwd_args* args, const gg_schedule* sched, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* GRPO_GUARD_KERNELS_H */
