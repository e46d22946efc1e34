// gg_emu.h: runs the CUDA fallback's kernels (csrc/*.cu, unchanged) on the CPU, for the tests of a machine
// without a GPU. Not a general CUDA emulator: it provides exactly what csrc uses, and refuses the rest at compile
// time (an unknown intrinsic does not compile) or at run time (a launch error naming what went wrong).
//
// Execution model, as on a GPU where it matters for correctness:
// - blocks run one after another, in index order, or in a shuffled order when the environment variable
//   GG_EMU_BLOCK_SEED is set (its value seeds the permutation; the single-launch forward's result must not depend
//   on which block of a group arrives last); the threads of a block run as cooperative user-level threads on
//   one OS thread, each to its next barrier, so __syncthreads and the warp shuffles have their CUDA meaning
//   (a thread waits until every thread of its block / warp arrived; threads that returned count as arrived at
//   __syncthreads, as on Volta and later);
// - __shared__ variables are function statics: one copy, reused by each block in turn;
// - a barrier that can never complete (a shuffle with lanes that returned, divergent __syncthreads) is a launch
//   error, where a GPU would hang or be undefined;
// - float and double arithmetic is IEEE round-to-nearest (build with -ffp-contract=off: the kernels' explicitly
//   rounded __f*_rn operations then round exactly as on the GPU; plain expressions that nvcc may contract into
//   FMAs round once more here); expf/logf/... are the C library's (within an ulp or two of CUDA's);
// - half and bfloat16 conversions round to nearest even, as CUDA's __float2half_rn / __float2bfloat16_rn.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

// The running thread's coordinates (one emulated thread runs at a time).
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// ---- half and bfloat16 storage types --------------------------------------------------------------------------
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __half2float(__half h) {
  _Float16 f;
  memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // round to nearest even
  __half h;
  memcpy(&h.x, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.x) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (overflows to inf as the hardware does)
  return {static_cast<uint16_t>(u >> 16)};
}

// ---- explicitly rounded arithmetic ------------------------------------------------------------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline double __longlong_as_double(long long v) {
  double d;
  memcpy(&d, &v, sizeof d);
  return d;
}

// ---- the scheduler --------------------------------------------------------------------------------------------
namespace gg_emu {

constexpr size_t kStack = 64 * 1024;

enum State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

// Switching between the scheduler and a thread: on x86-64 a few instructions (tests/cuda_emu/emu_switch.cpp:
// callee-saved registers and the stack pointer), elsewhere ucontext's swapcontext (a system call per switch).
#if defined(__x86_64__)
extern "C" void gg_emu_switch(void** save_sp, void* load_sp);
struct Context {
  void* sp = nullptr;
};
inline void switch_to(Context& from, Context& to) { gg_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Thread {
  Context ctx;
  State state = kReady;
};

struct Block {
  unsigned n = 0, cur = 0, done = 0, at_block = 0;
  std::vector<Thread> threads;
  std::vector<unsigned> at_warp;
  std::vector<uint64_t> lanes;  // the shuffle exchange: one slot per thread
  Context scheduler;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
};

inline Block* g_block = nullptr;
inline std::vector<std::unique_ptr<char[]>> g_stacks;

inline void fail(const std::string& message) {
  if (g_error == cudaSuccess) {
    g_error = cudaErrorLaunchFailure;
    g_message = message;
  }
}

inline void yield() {
  Block& b = *g_block;
  switch_to(b.threads[b.cur].ctx, b.scheduler);
}

inline void release_block_barrier(Block& b) {
  if (b.at_block > 0 && b.at_block + b.done == b.n) {
    for (auto& t : b.threads)
      if (t.state == kAtBlockBarrier) t.state = kReady;
    b.at_block = 0;
  }
}

inline void sync_block() {
  Block& b = *g_block;
  b.threads[b.cur].state = kAtBlockBarrier;
  ++b.at_block;
  release_block_barrier(b);
  while (b.threads[b.cur].state == kAtBlockBarrier) yield();
}

inline void sync_warp() {
  Block& b = *g_block;
  const unsigned w = b.cur / 32, first = w * 32, size = std::min(32u, b.n - first);
  b.threads[b.cur].state = kAtWarpBarrier;
  if (++b.at_warp[w] == size) {
    for (unsigned i = first; i < first + size; ++i) b.threads[i].state = kReady;
    b.at_warp[w] = 0;
  }
  while (b.threads[b.cur].state == kAtWarpBarrier) yield();
}

// A thread's first function: the kernel, then back to the scheduler for good.
inline void entry() {
  Block& b = *g_block;
  b.body(b.arg);
  b.threads[b.cur].state = kDone;
  switch_to(b.threads[b.cur].ctx, b.scheduler);
  __builtin_trap();  // a finished thread is never resumed
}

// Make ``t`` start at entry() on ``stack`` when first switched to.
inline void start(Context& t, char* stack) {
#if defined(__x86_64__)
  // what gg_emu_switch pops: six callee-saved registers, then the address it returns to (entry), placed so
  // that entry starts with the stack aligned as after a call (rsp = 8 mod 16)
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kStack) & ~static_cast<uintptr_t>(15);
  void** sp = reinterpret_cast<void**>(top - 16);
  sp[0] = reinterpret_cast<void*>(&entry);
  sp[1] = nullptr;
  sp -= 6;
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  t.sp = sp;
#else
  getcontext(&t.uc);
  t.uc.uc_stack.ss_sp = stack;
  t.uc.uc_stack.ss_size = kStack;
  t.uc.uc_link = nullptr;
  makecontext(&t.uc, entry, 0);
#endif
}

// Runs body(arg) as every thread of every block of the grid.
inline void run(dim3 grid, dim3 block, void (*body)(void*), void* arg) {
  if (g_error != cudaSuccess) return;  // a failed launch poisons the stream, as on a GPU
  if (grid.x == 0 || grid.y * grid.z != 1 || block.y * block.z != 1 || block.x == 0 || block.x > 1024) {
    fail("invalid or unemulated launch configuration (1-D grids of 1 or more blocks of 1..1024 threads only)");
    return;
  }
  while (g_stacks.size() < block.x) g_stacks.emplace_back(new char[kStack]);
  gridDim = grid;
  blockDim = block;
  std::vector<unsigned> order(grid.x);
  for (unsigned i = 0; i < grid.x; ++i) order[i] = i;
  if (const char* seed = getenv("GG_EMU_BLOCK_SEED")) {
    std::mt19937 rng(static_cast<unsigned>(strtoul(seed, nullptr, 10)));
    std::shuffle(order.begin(), order.end(), rng);
  }
  for (unsigned k = 0; k < grid.x && g_error == cudaSuccess; ++k) {
    const unsigned bi = order[k];
    Block b;
    b.n = block.x;
    b.threads.resize(b.n);
    b.at_warp.assign((b.n + 31) / 32, 0);
    b.lanes.assign(b.n, 0);
    b.body = body;
    b.arg = arg;
    g_block = &b;
    blockIdx = {bi, 0, 0};
    for (unsigned t = 0; t < b.n; ++t) start(b.threads[t].ctx, g_stacks[t].get());
    for (;;) {
      bool ran = false;
      for (unsigned t = 0; t < b.n; ++t) {
        if (b.threads[t].state != kReady) continue;
        ran = true;
        b.cur = t;
        threadIdx = {t, 0, 0};
        switch_to(b.scheduler, b.threads[t].ctx);
        if (b.threads[t].state == kDone) {
          ++b.done;
          release_block_barrier(b);
        }
      }
      if (b.done == b.n) break;
      if (!ran) {
        fail("block " + std::to_string(bi) + ": threads wait at a barrier that cannot complete (a warp shuffle "
             "with lanes that returned, or __syncthreads in divergent code)");
        break;
      }
    }
    g_block = nullptr;
  }
}

// GG_LAUNCH(kernel, grid, block, stream)(args...): the arguments converted to the kernel's parameter types, then
// the kernel run as every thread.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  template <typename... A>
  void operator()(A&&... a) const {
    std::tuple<P...> args(static_cast<P>(std::forward<A>(a))...);
    std::pair<void (*)(P...), std::tuple<P...>*> call(kernel, &args);
    run(grid, block, [](void* p) {
      auto* c = static_cast<std::pair<void (*)(P...), std::tuple<P...>*>*>(p);
      std::apply(c->first, *c->second);
    }, &call);
  }
};
template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block) {
  return {kernel, grid, block};
}

template <typename T>
T exchange(T v, unsigned src, bool valid) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  Block& b = *g_block;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  b.lanes[b.cur] = bits;
  sync_warp();
  T r = v;
  if (valid) memcpy(&r, &b.lanes[(b.cur & ~31u) + src], sizeof(T));
  sync_warp();  // nobody overwrites its slot before every lane has read
  return r;
}

inline void check_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("warp shuffles with a partial mask are not emulated");
}

// A GPU faults on a misaligned 16-byte access; x86 does not notice, so the emulator checks (csrc's GG_ALIGNED16):
// a misaligned one fails the launch and is not made.
inline bool aligned16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 == 0) return true;
  fail("misaligned 16-byte access");
  return false;
}

}  // namespace gg_emu

#define GG_LAUNCH(kernel, grid, block, stream) ::gg_emu::launch(kernel, grid, block)
#define GG_ALIGNED16(p) ::gg_emu::aligned16(p)

inline void __syncthreads() { gg_emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  gg_emu::check_mask(mask);
  gg_emu::sync_warp();
}
inline void __threadfence() {}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  gg_emu::check_mask(mask);
  const unsigned lane = threadIdx.x & 31u;
  return gg_emu::exchange(v, lane + delta, lane + delta < 32u);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  gg_emu::check_mask(mask);
  const unsigned lane = threadIdx.x & 31u;
  return gg_emu::exchange(v, lane ^ static_cast<unsigned>(lane_mask), true);
}

// Atomics: one emulated thread runs at a time, so plain read-modify-writes are atomic.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
inline int atomicOr(int* p, int v) {
  const int old = *p;
  *p = old | v;
  return old;
}
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  const unsigned old = *p;
  *p = old >= limit ? 0u : old + 1u;
  return old;
}
