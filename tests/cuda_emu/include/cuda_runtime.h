// The emulated CUDA runtime (cuda_emu.h), in front of the real cuda_runtime.h in tests/cuda_emu builds.
#pragma once
#include "cuda_emu.h"
