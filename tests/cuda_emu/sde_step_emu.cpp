// The CUDA fallback's sde_step kernels, compiled for the CPU emulator (gg_emu.h).
#include "sde_step.cu"
