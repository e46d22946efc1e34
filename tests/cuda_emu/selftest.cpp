// The emulator's own semantics (tests/test_cuda_emulator.py builds and runs this): barriers, shared memory,
// warp shuffles, block order, atomics, and a barrier that cannot complete reported as a launch error.
// Prints one "name value" line per check; the test compares them with what CUDA defines.
#include <cuda_runtime.h>
#include <stdio.h>

#include <vector>

// thread t writes t into shared memory; after the barrier it reads its neighbour's value
__global__ void neighbour(int* out) {
  __shared__ int sh[256];
  sh[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = sh[(threadIdx.x + 1) % blockDim.x] + 1000 * blockIdx.x;
}

// per warp: a shuffle-down tree sum (lane 0 holds it) and a xor butterfly (every lane holds it)
__global__ void warp_sums(const float* in, float* down, float* butterfly) {
  float a = in[threadIdx.x], b = a;
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  down[threadIdx.x] = a;
  butterfly[threadIdx.x] = b;
}

// blocks take tickets: the block that takes the last one sees every other block's write
__global__ void tickets(int* counter, int* slots, int* last_sum) {
  if (threadIdx.x != 0) return;
  slots[blockIdx.x] = static_cast<int>(blockIdx.x) + 1;
  __threadfence();
  if (atomicAdd(counter, 1) == static_cast<int>(gridDim.x) - 1) {
    int s = 0;
    for (unsigned i = 0; i < gridDim.x; ++i) s += slots[i];
    *last_sum = s;
    *counter = 0;
  }
}

// lanes 0-15 return, lanes 16-31 shuffle: undefined on a GPU, a launch error here
__global__ void divergent_shuffle(float* out) {
  if ((threadIdx.x & 31) < 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

int main() {
  std::vector<int> out(2 * 64);
  GG_LAUNCH(neighbour, 2, 64, nullptr)(out.data());
  int bad = 0;
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 64; ++t) bad += out[b * 64 + t] != (t + 1) % 64 + 1000 * b;
  printf("neighbour_errors %d\n", bad);
  printf("neighbour_launch %d\n", static_cast<int>(cudaGetLastError()));

  std::vector<float> in(64), down(64), butterfly(64);
  for (int i = 0; i < 64; ++i) in[i] = static_cast<float>(i);
  GG_LAUNCH(warp_sums, 1, 64, nullptr)(in.data(), down.data(), butterfly.data());
  printf("down_lane0_warp0 %g\n", down[0]);
  printf("down_lane0_warp1 %g\n", down[32]);
  int spread = 0;
  for (int i = 0; i < 64; ++i) spread += butterfly[i] != butterfly[(i / 32) * 32];
  printf("butterfly_warp0 %g\n", butterfly[0]);
  printf("butterfly_disagreeing_lanes %d\n", spread);

  int counter = 0, last_sum = -1;
  std::vector<int> slots(5, 0);
  GG_LAUNCH(tickets, 5, 32, nullptr)(&counter, slots.data(), &last_sum);
  printf("tickets_last_sum %d\n", last_sum);
  printf("tickets_counter_reset %d\n", counter);

  std::vector<float> junk(32, 0.0f);
  GG_LAUNCH(divergent_shuffle, 1, 32, nullptr)(junk.data());
  const cudaError_t err = cudaGetLastError();
  printf("divergent_launch %d\n", static_cast<int>(err));
  printf("divergent_message_names_barrier %d\n", strstr(cudaGetErrorString(err), "barrier") != nullptr);
  printf("error_cleared %d\n", static_cast<int>(cudaGetLastError()));
  GG_LAUNCH(neighbour, 1, 64, nullptr)(out.data());
  printf("after_error_launch %d\n", static_cast<int>(cudaGetLastError()));
  return 0;
}
