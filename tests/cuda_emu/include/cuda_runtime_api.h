// tests/cuda_emu: what csrc needs of the CUDA runtime API, for a build without CUDA (the emulator's sticky launch
// error lives here: csrc/binding.cpp reads it through cudaGetErrorString, the kernels' launchers set it).
#pragma once

#include <string>

typedef enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 } cudaError_t;
typedef struct CUstream_st* cudaStream_t;

namespace gg_emu {
inline cudaError_t g_error = cudaSuccess;
inline std::string g_message;
}  // namespace gg_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = gg_emu::g_error;
  gg_emu::g_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : gg_emu::g_message.c_str();
}
