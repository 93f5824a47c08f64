// Host stand-in for CUDA's cuda_bf16.h, for the CPU emulation of the kernels (emu.h): a bf16
// held as a float (only the f32 instances are checked).
#pragma once
struct __nv_bfloat16 { float v; };
inline float __bfloat162float(__nv_bfloat16 h) { return h.v; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{f}; }
