// tests/cuda_emu: the CUDA headers csrc includes, on the CPU.
#pragma once
#include "gg_emu.h"
