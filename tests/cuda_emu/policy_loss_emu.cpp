// The CUDA fallback's policy_loss kernels, compiled for the CPU emulator (gg_emu.h).
#include "policy_loss.cu"
