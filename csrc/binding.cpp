// grpo_guard._C: torch binding of the CUDA launchers in gg_kernels.h (kernels in sde_step.cu, policy_loss.cu).
//
// Called by grpo_guard/ops/cuda_backend.py, which prepares the inputs: CUDA tensors whose samples are contiguous
// (any stride over the batch dim: read in place), latent inputs in one storage dtype T, compute-dtype (TC: float64
// for float64, else float32) tensors where the API says TC, sigmas as float64 (B,) tensors or Python floats. The
// autograd.Functions live in Python.
#include <torch/extension.h>

#ifdef GG_EMULATE  // tests/cuda_emu: the same kernels run on the CPU through an emulator, on CPU tensors
#define GG_ON_DEVICE(t) ((t).is_cpu())
#define GG_DEVICE_GUARD(device)
#define GG_STREAM() nullptr
#else
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#define GG_ON_DEVICE(t) ((t).is_cuda())
#define GG_DEVICE_GUARD(device) const c10::cuda::CUDAGuard guard(device)
#define GG_STREAM() c10::cuda::getCurrentCUDAStream().stream()
#endif

#include <algorithm>
#include <map>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "gg_kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return GG_F32;
    case at::kDouble: return GG_F64;
    case at::kHalf: return GG_F16;
    case at::kBFloat16: return GG_BF16;
    default: TORCH_CHECK(false, "grpo_guard._C: unsupported dtype ", t);
  }
  return -1;
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

const void* ptr_or_null(const OptTensor& t) { return t.has_value() && t->defined() ? t->data_ptr() : nullptr; }

// True if every sample t[i] is contiguous (any stride over dim 0).
bool samples_contiguous(const Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// The batch stride of a latent in elements (its sample size when B == 1).
int64_t batch_stride(const Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.numel(); }
int64_t batch_stride(const OptTensor& t) { return t.has_value() && t->defined() ? batch_stride(*t) : 0; }

void check_latent(const char* name, const Tensor& t, const Tensor& like, at::ScalarType dtype) {
  TORCH_CHECK(GG_ON_DEVICE(t), "grpo_guard._C: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == like.device(), "grpo_guard._C: ", name, " must be on ", like.device());
  TORCH_CHECK(t.dim() >= 1 && t.size(0) == like.size(0) && samples_contiguous(t), "grpo_guard._C: ", name,
              " must have ", like.size(0), " contiguous samples (any stride over the batch dim)");
  TORCH_CHECK(t.numel() == like.numel(), "grpo_guard._C: ", name, " has ", t.numel(), " elements, expected ",
              like.numel());
  TORCH_CHECK(t.scalar_type() == dtype, "grpo_guard._C: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_opt(const char* name, const OptTensor& t, const Tensor& like, at::ScalarType dtype) {
  if (t.has_value() && t->defined()) check_latent(name, *t, like, dtype);
}

void check_vector(const char* name, const OptTensor& t, const Tensor& like, int64_t B, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(GG_ON_DEVICE(*t) && t->device() == like.device() && t->is_contiguous() && t->numel() == B &&
                  t->scalar_type() == dtype,
              "grpo_guard._C: ", name, " must be a contiguous ", dtype, " tensor of ", B, " elements on ",
              like.device());
}

// `flags` of every function: bit 0 the vector element layout (gg_kernels.h, vec), bit 1 the device-side checks
// (gg_schedule.check; the forwards then return the failed checks' bits as a last output, int32 (1,)), bit 2 the
// single-launch forwards (gg_kernels.h; with bit 0 only).
constexpr int64_t kFlagVec = 1, kFlagCheck = 2, kFlagFused = 4;

void check_flags(int64_t flags) {
  TORCH_CHECK(flags >= 0 && flags <= (kFlagVec | kFlagCheck | kFlagFused) &&
                  (!(flags & kFlagFused) || (flags & kFlagVec)),
              "grpo_guard._C: bad flags ", flags, " (bit 2, the single launch, needs bit 0, the vector layout)");
}

// The arrival counters of the single-launch forwards: an int32 buffer of at least n zeros. The kernels leave it zero,
// so one buffer per (device, stream) serves every launch on that stream (stream order keeps launches apart). A call
// captured into a CUDA graph gets its own zeroed buffer (a memset node of the graph), so the graph's replays never
// share counters with work outside it. Never freed (static destruction would outlive the allocator). Keyed by the
// stream handle: torch's streams live as long as the process; a stream destroyed while a launch on it still runs,
// whose handle is then reused by another stream, would share its counters (do not destroy streams with work on them).
// The caller keeps the returned tensor alive until after the launch (a captured call's buffer is its own).
Tensor counters(const Tensor& like, int64_t n) {
  const auto opts = like.options().dtype(at::kInt);
#ifdef GG_EMULATE
  const std::pair<int64_t, uintptr_t> key{-1, 0};
#else
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t asked = cudaStreamIsCapturing(GG_STREAM(), &capture);
  if (asked != cudaSuccess) {
    (void)cudaGetLastError();  // not left pending for the next launch's check
    TORCH_CHECK(false, "grpo_guard._C: cudaStreamIsCapturing failed: ", cudaGetErrorString(asked));
  }
  if (capture != cudaStreamCaptureStatusNone) return at::zeros({n}, opts);
  const std::pair<int64_t, uintptr_t> key{like.device().index(), reinterpret_cast<uintptr_t>(GG_STREAM())};
#endif
  static std::mutex mu;
  static auto* buffers = new std::map<std::pair<int64_t, uintptr_t>, Tensor>();
  const std::lock_guard<std::mutex> lock(mu);
  Tensor& buf = (*buffers)[key];
  if (!buf.defined() || buf.numel() < n) buf = at::zeros({std::max<int64_t>(n, 1024)}, opts);
  return buf;
}

gg_schedule make_schedule(const Tensor& like, int64_t B, const OptTensor& sigma, const OptTensor& sigma_next,
                          double sigma_value, double sigma_next_value, double eta, double sin_half_pi_eta,
                          int64_t dynamics, int64_t flags, bool refuse_zero_next = false) {
  check_flags(flags);
  check_vector("sigma", sigma, like, B, at::kDouble);
  check_vector("sigma_next", sigma_next, like, B, at::kDouble);
  TORCH_CHECK(dynamics >= GG_FLOW && dynamics <= GG_CPS, "grpo_guard._C: bad dynamics code ", dynamics);
  gg_schedule s;
  s.sigma = static_cast<const double*>(ptr_or_null(sigma));
  s.sigma_next = static_cast<const double*>(ptr_or_null(sigma_next));
  s.sigma_value = sigma_value;
  s.sigma_next_value = sigma_next_value;
  s.eta = eta;
  s.sin_half_pi_eta = sin_half_pi_eta;
  s.dynamics = static_cast<int>(dynamics);
  s.check = (flags & kFlagCheck) != 0;
  s.refuse_zero_next = s.check && refuse_zero_next;
  return s;
}

void check_grid(int64_t B, int64_t D) {
  TORCH_CHECK(B > 0 && D > 0, "grpo_guard._C: empty latents (B = ", B, ", D = ", D, ")");
  TORCH_CHECK(B * gg_num_chunks(D) <= INT32_MAX, "grpo_guard._C: batch x chunks exceeds the launch grid");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "grpo_guard._C: ", what, " failed: ", cudaGetErrorString(err));
}

// -> [log_prob (B,), mean (like v, TC) or None without need_mean, std_dev_t (B,), prev_out (like v, T) or None
//     unless a rollout, failed-check bits (int32 (1,)) or None without the checks]
std::vector<Tensor> sde_forward(const Tensor& v, const Tensor& x, const OptTensor& prev, const OptTensor& noise,
                                const OptTensor& sigma, const OptTensor& sigma_next, double sigma_value,
                                double sigma_next_value, double eta, double sin_half_pi_eta, int64_t dynamics,
                                int64_t round_mode, bool need_mean, int64_t flags) {
  const at::ScalarType T = v.scalar_type(), TC = compute_type(T);
  const int64_t B = v.size(0), D = B > 0 ? v.numel() / B : 0;
  check_grid(B, D);
  check_latent("model_output", v, v, T);
  check_latent("sample", x, v, T);
  check_opt("prev_sample", prev, v, T);
  check_opt("noise", noise, v, TC);
  const bool rollout = !(prev.has_value() && prev->defined());
  TORCH_CHECK(!rollout || (noise.has_value() && noise->defined()), "grpo_guard._C: a rollout needs noise");
  TORCH_CHECK(need_mean || (flags & kFlagVec), "grpo_guard._C: the strided layout (flags bit 0 unset) always "
              "writes the mean");
  GG_DEVICE_GUARD(v.device());
  const gg_schedule sched = make_schedule(v, B, sigma, sigma_next, sigma_value, sigma_next_value, eta,
                                          sin_half_pi_eta, dynamics, flags);
  const auto opts = v.options().dtype(TC);
  Tensor log_prob = at::empty({B}, opts), std_dev_t = at::empty({B}, opts);
  Tensor mean = need_mean ? at::empty(v.sizes(), opts) : Tensor();
  Tensor partial = at::empty({B * gg_num_chunks(D)}, opts);
  Tensor prev_out = rollout ? at::empty(v.sizes(), v.options()) : Tensor();
  Tensor err = sched.check ? at::empty({1}, v.options().dtype(at::kInt)) : Tensor();
  gg_sde_fwd_args a;
  a.dtype = dtype_code(T);
  a.round_mode = static_cast<int>(round_mode);
  a.vec = (flags & kFlagVec) ? 1 : 0;
  a.B = B;
  a.D = D;
  a.v = v.data_ptr();
  a.x = x.data_ptr();
  a.prev_in = ptr_or_null(prev);
  a.noise = rollout ? noise->data_ptr() : nullptr;
  a.prev_out = rollout ? prev_out.data_ptr() : nullptr;
  a.mean = need_mean ? mean.data_ptr() : nullptr;
  a.log_prob = log_prob.data_ptr();
  a.std_dev_t = std_dev_t.data_ptr();
  a.partial = partial.data_ptr();
  a.err = sched.check ? err.data_ptr() : nullptr;
  a.s_v = batch_stride(v);
  a.s_x = batch_stride(x);
  a.s_prev = batch_stride(prev);
  a.s_noise = batch_stride(noise);
  const Tensor cnt = (flags & kFlagFused) ? counters(v, B) : Tensor();  // alive until after the launch
  a.counters = cnt.defined() ? cnt.data_ptr() : nullptr;
  check_launch(gg_sde_forward(&a, &sched, GG_STREAM()), "sde_step forward");
  return {log_prob, mean, std_dev_t, prev_out, err};
}

// -> [grad_v or None, grad_x or None]
std::vector<Tensor> sde_backward(const OptTensor& g_mean, const OptTensor& g_prev, const OptTensor& g_logp,
                                 const Tensor& prev, const Tensor& mean, bool need_v, bool need_x,
                                 const OptTensor& sigma, const OptTensor& sigma_next, double sigma_value,
                                 double sigma_next_value, double eta, double sin_half_pi_eta, int64_t dynamics,
                                 int64_t flags) {
  const at::ScalarType T = prev.scalar_type(), TC = compute_type(T);
  const int64_t B = prev.size(0), D = B > 0 ? prev.numel() / B : 0;
  check_grid(B, D);
  check_latent("prev_sample", prev, prev, T);
  check_latent("prev_sample_mean", mean, prev, TC);
  check_opt("grad prev_sample_mean", g_mean, prev, TC);
  check_opt("grad prev_sample", g_prev, prev, T);
  TORCH_CHECK(mean.is_contiguous() && (!g_mean.has_value() || !g_mean->defined() || g_mean->is_contiguous()) &&
                  (!g_prev.has_value() || !g_prev->defined() || g_prev->is_contiguous()),
              "grpo_guard._C: the saved mean and the incoming gradients must be contiguous");
  check_vector("grad log_prob", g_logp, prev, B, TC);
  GG_DEVICE_GUARD(prev.device());
  const gg_schedule sched = make_schedule(prev, B, sigma, sigma_next, sigma_value, sigma_next_value, eta,
                                          sin_half_pi_eta, dynamics, flags);
  Tensor grad_v = need_v ? at::empty(prev.sizes(), prev.options()) : Tensor();
  Tensor grad_x = need_x ? at::empty(prev.sizes(), prev.options()) : Tensor();
  gg_sde_bwd_args a;
  a.dtype = dtype_code(T);
  a.vec = (flags & kFlagVec) ? 1 : 0;
  a.B = B;
  a.D = D;
  a.g_mean = ptr_or_null(g_mean);
  a.g_prev = ptr_or_null(g_prev);
  a.g_logp = ptr_or_null(g_logp);
  a.prev = prev.data_ptr();
  a.mean = mean.data_ptr();
  a.grad_v = need_v ? grad_v.data_ptr() : nullptr;
  a.grad_x = need_x ? grad_x.data_ptr() : nullptr;
  a.s_prev = batch_stride(prev);
  if (need_v || need_x)
    check_launch(gg_sde_backward(&a, &sched, GG_STREAM()), "sde_step backward");
  return {grad_v, grad_x};
}

int old_mode(const OptTensor& mu_old, const OptTensor& v_old) {
  if (mu_old.has_value() && mu_old->defined()) return GG_OLD_MEAN;
  if (v_old.has_value() && v_old->defined()) return GG_OLD_V;
  return GG_OLD_LOGP;
}

// -> [loss (), stats (4,; dppo 9,), log_ratio (B,), bias (B,) or None, coefs (B, 2), failed-check bits (int32 (1,))
//     or None without the checks]
std::vector<Tensor> loss_forward(const Tensor& v, const Tensor& x, const Tensor& prev, const OptTensor& mu_old,
                                 const OptTensor& v_old, const Tensor& adv, const OptTensor& old_logp,
                                 const OptTensor& sigma, const OptTensor& sigma_next, double sigma_value,
                                 double sigma_next_value, double eta, double sin_half_pi_eta, int64_t dynamics,
                                 int64_t method, double clip_lo, double clip_hi, double adv_clip_max,
                                 int64_t guard_weight, double kl_threshold, int64_t flags) {
  const at::ScalarType T = v.scalar_type(), TC = compute_type(T);
  const int64_t B = v.size(0), D = B > 0 ? v.numel() / B : 0;
  check_grid(B, D);
  check_latent("model_output", v, v, T);
  check_latent("sample", x, v, T);
  check_latent("prev_sample", prev, v, T);
  check_opt("old_prev_sample_mean", mu_old, v, TC);
  check_opt("old_model_output", v_old, v, T);
  check_vector("advantages", adv, v, B, TC);
  check_vector("old_log_prob", old_logp, v, B, TC);
  TORCH_CHECK(adv.defined(), "grpo_guard._C: advantages are required");
  TORCH_CHECK(method >= GG_GRPO && method <= GG_DPPO, "grpo_guard._C: bad method code ", method);
  gg_loss_config cfg;
  cfg.method = static_cast<int>(method);
  cfg.old_mode = old_mode(mu_old, v_old);
  cfg.guard_weight = static_cast<int>(guard_weight);
  cfg.clip_lo = clip_lo;
  cfg.clip_hi = clip_hi;
  cfg.adv_clip_max = adv_clip_max;
  cfg.kl_threshold = kl_threshold;
  TORCH_CHECK(cfg.old_mode != GG_OLD_LOGP || (method == GG_GRPO && old_logp.has_value() && old_logp->defined()),
              "grpo_guard._C: without an old mean or velocity only method grpo with old_log_prob is defined");
  GG_DEVICE_GUARD(v.device());
  const bool divides_by_std = method == GG_RATIO_NORM || method == GG_GUARD || method == GG_DPPO;
  const gg_schedule sched = make_schedule(v, B, sigma, sigma_next, sigma_value, sigma_next_value, eta,
                                          sin_half_pi_eta, dynamics, flags, dynamics == GG_CPS && divides_by_std);
  const auto opts = v.options().dtype(TC);
  Tensor err = sched.check ? at::empty({1}, v.options().dtype(at::kInt)) : Tensor();
  Tensor loss = at::empty({}, opts), stats = at::empty({method == GG_DPPO ? 9 : 4}, opts);
  Tensor log_ratio = at::empty({B}, opts);
  Tensor bias = cfg.old_mode == GG_OLD_LOGP ? Tensor() : at::empty({B}, opts);
  Tensor coefs = at::empty({B, 2}, opts), work = at::empty({4 * B}, opts);
  Tensor partial = at::empty({B * 2 * gg_num_chunks(D)}, opts);
  gg_loss_fwd_args a;
  a.dtype = dtype_code(T);
  a.vec = (flags & kFlagVec) ? 1 : 0;
  a.B = B;
  a.D = D;
  a.v = v.data_ptr();
  a.x = x.data_ptr();
  a.prev = prev.data_ptr();
  a.mu_old = ptr_or_null(mu_old);
  a.v_old = ptr_or_null(v_old);
  a.adv = adv.data_ptr();
  a.old_logp = ptr_or_null(old_logp);
  a.loss = loss.data_ptr();
  a.stats = stats.data_ptr();
  a.log_ratio = log_ratio.data_ptr();
  a.bias = bias.defined() ? bias.data_ptr() : nullptr;
  a.coefs = coefs.data_ptr();
  a.partial = partial.data_ptr();
  a.work = work.data_ptr();
  a.err = sched.check ? err.data_ptr() : nullptr;
  a.s_v = batch_stride(v);
  a.s_x = batch_stride(x);
  a.s_prev = batch_stride(prev);
  a.s_old = batch_stride(mu_old) + batch_stride(v_old);  // at most one is given
  const Tensor cnt = (flags & kFlagFused) ? counters(v, B + 1) : Tensor();  // alive until after the launch
  a.counters = cnt.defined() ? cnt.data_ptr() : nullptr;
  check_launch(gg_loss_forward(&a, &sched, &cfg, GG_STREAM()), "policy_loss forward");
  return {loss, stats, log_ratio, bias, coefs, err};
}

Tensor loss_backward(const Tensor& v, const Tensor& x, const Tensor& prev, const OptTensor& mu_old,
                     const OptTensor& v_old, const Tensor& coefs, const Tensor& grad_loss, const OptTensor& sigma,
                     const OptTensor& sigma_next, double sigma_value, double sigma_next_value, double eta,
                     double sin_half_pi_eta, int64_t dynamics, int64_t flags) {
  const at::ScalarType T = v.scalar_type(), TC = compute_type(T);
  const int64_t B = v.size(0), D = B > 0 ? v.numel() / B : 0;
  check_grid(B, D);
  check_latent("model_output", v, v, T);
  check_latent("sample", x, v, T);
  check_latent("prev_sample", prev, v, T);
  check_opt("old_prev_sample_mean", mu_old, v, TC);
  check_opt("old_model_output", v_old, v, T);
  check_vector("coefs", coefs, v, 2 * B, TC);
  check_vector("grad loss", grad_loss, v, 1, TC);
  GG_DEVICE_GUARD(v.device());
  const gg_schedule sched = make_schedule(v, B, sigma, sigma_next, sigma_value, sigma_next_value, eta,
                                          sin_half_pi_eta, dynamics, flags);
  Tensor grad_v = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  gg_loss_bwd_args a;
  a.dtype = dtype_code(T);
  a.old_mode = old_mode(mu_old, v_old);
  a.vec = (flags & kFlagVec) ? 1 : 0;
  a.B = B;
  a.D = D;
  a.v = v.data_ptr();
  a.x = x.data_ptr();
  a.prev = prev.data_ptr();
  a.mu_old = ptr_or_null(mu_old);
  a.v_old = ptr_or_null(v_old);
  a.coefs = coefs.data_ptr();
  a.grad_loss = grad_loss.data_ptr();
  a.grad_v = grad_v.data_ptr();
  a.s_v = batch_stride(v);
  a.s_x = batch_stride(x);
  a.s_prev = batch_stride(prev);
  a.s_old = batch_stride(mu_old) + batch_stride(v_old);
  check_launch(gg_loss_backward(&a, &sched, GG_STREAM()), "policy_loss backward");
  return grad_v;
}

// ---- torch.library operators (torch.compile, export, CUDA graphs): fixed outputs, empty tensors for absent ones --

Tensor or_empty(const Tensor& t, const Tensor& like) { return t.defined() ? t : at::empty({0}, like.options()); }
Tensor or_empty_bits(const Tensor& t, const Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options().dtype(at::kInt));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sde_step_cuda(
    const Tensor& v, const Tensor& x, const OptTensor& prev, const OptTensor& noise, const OptTensor& sigma,
    const OptTensor& sigma_next, double sigma_value, double sigma_next_value, double eta, double sin_half_pi_eta,
    int64_t dynamics, int64_t round_mode, bool need_mean, int64_t flags) {
  auto out = sde_forward(v, x, prev, noise, sigma, sigma_next, sigma_value, sigma_next_value, eta, sin_half_pi_eta,
                         dynamics, round_mode, need_mean, flags);
  return {out[0], or_empty(out[1], out[0]), out[2], or_empty(out[3], v), or_empty_bits(out[4], v)};
}

std::tuple<Tensor, Tensor> sde_step_cuda_backward(
    const OptTensor& g_mean, const OptTensor& g_prev, const OptTensor& g_logp, const Tensor& prev, const Tensor& mean,
    bool need_v, bool need_x, const OptTensor& sigma, const OptTensor& sigma_next, double sigma_value,
    double sigma_next_value, double eta, double sin_half_pi_eta, int64_t dynamics, int64_t flags) {
  auto g = sde_backward(g_mean, g_prev, g_logp, prev, mean, need_v, need_x, sigma, sigma_next, sigma_value,
                        sigma_next_value, eta, sin_half_pi_eta, dynamics, flags);
  return {or_empty(g[0], prev), or_empty(g[1], prev)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> policy_loss_cuda(
    const Tensor& v, const Tensor& x, const Tensor& prev, const OptTensor& mu_old, const OptTensor& v_old,
    const Tensor& adv, const OptTensor& old_logp, const OptTensor& sigma, const OptTensor& sigma_next,
    double sigma_value, double sigma_next_value, double eta, double sin_half_pi_eta, int64_t dynamics,
    int64_t method, double clip_lo, double clip_hi, double adv_clip_max, int64_t guard_weight,
    double kl_threshold, int64_t flags) {
  auto out = loss_forward(v, x, prev, mu_old, v_old, adv, old_logp, sigma, sigma_next, sigma_value,
                          sigma_next_value, eta, sin_half_pi_eta, dynamics, method, clip_lo, clip_hi, adv_clip_max,
                          guard_weight, kl_threshold, flags);
  return {out[0], out[1], out[2], or_empty(out[3], out[2]), out[4], or_empty_bits(out[5], v)};
}

}  // namespace

// Schemas of the operators (their fake implementations and autograd formulas are registered from Python,
// grpo_guard/ops/library.py). FRAGMENT: the Python side defines other operators of the namespace.
TORCH_LIBRARY_FRAGMENT(grpo_guard, m) {
  m.def("sde_step_cuda(Tensor v, Tensor x, Tensor? prev_sample, Tensor? noise, Tensor? sigma, Tensor? sigma_next, "
        "float sigma_value, float sigma_next_value, float eta, float sin_half_pi_eta, int dynamics, int round_mode, "
        "bool need_mean=True, int flags=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sde_step_cuda_backward(Tensor? g_mean, Tensor? g_prev, Tensor? g_logp, Tensor prev_sample, Tensor mean, "
        "bool need_v, bool need_x, Tensor? sigma, Tensor? sigma_next, float sigma_value, float sigma_next_value, "
        "float eta, float sin_half_pi_eta, int dynamics, int flags=0) -> (Tensor, Tensor)");
  m.def("policy_loss_cuda(Tensor v, Tensor x, Tensor prev_sample, Tensor? mu_old, Tensor? v_old, Tensor advantages, "
        "Tensor? old_log_prob, Tensor? sigma, Tensor? sigma_next, float sigma_value, float sigma_next_value, "
        "float eta, float sin_half_pi_eta, int dynamics, int method, float clip_lo, float clip_hi, "
        "float adv_clip_max, int guard_weight, float kl_threshold, int flags=0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("policy_loss_cuda_backward(Tensor v, Tensor x, Tensor prev_sample, Tensor? mu_old, Tensor? v_old, "
        "Tensor coefs, Tensor grad_loss, Tensor? sigma, Tensor? sigma_next, float sigma_value, "
        "float sigma_next_value, float eta, float sin_half_pi_eta, int dynamics, int flags=0) -> Tensor");
}

#ifdef GG_EMULATE
TORCH_LIBRARY_IMPL(grpo_guard, CPU, m) {
#else
TORCH_LIBRARY_IMPL(grpo_guard, CUDA, m) {
#endif
  m.impl("sde_step_cuda", &sde_step_cuda);
  m.impl("sde_step_cuda_backward", &sde_step_cuda_backward);
  m.impl("policy_loss_cuda", &policy_loss_cuda);
  m.impl("policy_loss_cuda_backward", &loss_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "grpo_guard CUDA kernels (csrc/): sde_step and policy_loss forward/backward";
  m.attr("CHUNK") = GG_CHUNK;
  m.def("sde_forward", &sde_forward);
  m.def("sde_backward", &sde_backward);
  m.def("loss_forward", &loss_forward);
  m.def("loss_backward", &loss_backward);
}
