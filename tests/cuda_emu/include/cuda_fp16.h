// Host stand-in for CUDA's cuda_fp16.h, for the CPU emulation of the kernels (emu.h): a half
// held as a float, for the f16 instances to compile (only f32 and bf16 are checked).
#pragma once
struct __half { float v; };
inline float __half2float(__half h) { return h.v; }
inline __half __float2half(float f) { return __half{f}; }
