// CUDA kernels of coin's fused ops (src/ml/fused.rs): forward and backward of RMSNorm, the masked
// scaled softmax, RoPE (rotate-half), SwiGLU and the product with a constant (dropout) mask.
// Every kernel is instantiated for f32, bf16 and f16 (suffixes _f32, _bf16, _f16); loads are
// widened to f32, all sums and transcendental functions run in f32 (as PyTorch's autocast does
// for these ops) and only the stored result is rounded to the tensor's dtype.
// build.rs compiles this file to PTX with nvcc under the `cuda` feature; src/ml/fused_cuda.rs
// loads it through candle's CudaDevice::get_or_load_custom_func and launches the kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned long long u64;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
    return __float2bfloat16(v);
}
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        v = lane < nw ? sh[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    const float r = sh[0];
    __syncthreads();
    return r;
}

// Maximum over the block, as block_sum.
__device__ __forceinline__ float block_max(float v, float *sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        v = lane < nw ? sh[lane] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    const float r = sh[0];
    __syncthreads();
    return r;
}

// ---- RMSNorm: y = x · r · w, r = 1/√(mean(x²) + ε); one block per row of h.
template <typename T>
__device__ void rms_norm_fwd(const T *x, const T *w, T *y, u64 h, float eps) {
    __shared__ float sh[32];
    const T *xr = x + blockIdx.x * h;
    T *yr = y + blockIdx.x * h;
    float ss = 0.0f;
    for (u64 j = threadIdx.x; j < h; j += blockDim.x) {
        const float v = to_f(xr[j]);
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
    for (u64 j = threadIdx.x; j < h; j += blockDim.x) yr[j] = from_f<T>(to_f(xr[j]) * r * to_f(w[j]));
}

// dx = r·(g·w − x·r·c), c = r·mean(g·w·x).
template <typename T>
__device__ void rms_norm_bwd(const T *x, const T *w, const T *g, T *dx, u64 h, float eps) {
    __shared__ float sh[32];
    const T *xr = x + blockIdx.x * h;
    const T *gr = g + blockIdx.x * h;
    T *dr = dx + blockIdx.x * h;
    float ss = 0.0f, dot = 0.0f;
    for (u64 j = threadIdx.x; j < h; j += blockDim.x) {
        const float v = to_f(xr[j]);
        ss += v * v;
        dot += to_f(gr[j]) * to_f(w[j]) * v;
    }
    ss = block_sum(ss, sh);
    dot = block_sum(dot, sh);
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
    const float c = dot * r / (float)h;
    for (u64 j = threadIdx.x; j < h; j += blockDim.x)
        dr[j] = from_f<T>(r * (to_f(gr[j]) * to_f(w[j]) - to_f(xr[j]) * r * c));
}

// r = 1/√(mean(x²) + ε) per row, in f32 (for dw).
template <typename T> __device__ void rms_norm_rrow(const T *x, float *rrow, u64 h, float eps) {
    __shared__ float sh[32];
    const T *xr = x + blockIdx.x * h;
    float ss = 0.0f;
    for (u64 j = threadIdx.x; j < h; j += blockDim.x) {
        const float v = to_f(xr[j]);
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    if (threadIdx.x == 0) rrow[blockIdx.x] = 1.0f / sqrtf(ss / (float)h + eps);
}

// dw[j] += Σ_rows g·x·r over the block's rows (grid.y splits the rows); dw zeroed f32.
template <typename T>
__device__ void rms_norm_dw(const T *x, const T *g, const float *rrow, float *dw, u64 rows, u64 h,
                            u64 rows_per_block) {
    const u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= h) return;
    const u64 r0 = (u64)blockIdx.y * rows_per_block;
    u64 r1 = r0 + rows_per_block;
    if (r1 > rows) r1 = rows;
    float acc = 0.0f;
    for (u64 r = r0; r < r1; ++r) acc += to_f(g[r * h + j]) * to_f(x[r * h + j]) * rrow[r];
    atomicAdd(dw + j, acc);
}

template <typename T> __device__ void cast_from_f32(const float *src, T *dst, u64 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = from_f<T>(src[i]);
}

// ---- Masked scaled softmax: p = softmax(s·scale + mask) over the last dimension t of a
// contiguous (d0, d1, d2, t) s; the mask is addressed by (start, strides), 0 for a broadcast
// dimension. One block per row.
template <typename T>
__device__ void masked_softmax_fwd(const T *s, const T *mask, T *p, u64 d1, u64 d2, u64 t, u64 mstart,
                                   u64 m0, u64 m1, u64 m2, u64 m3, float scale) {
    __shared__ float sh[32];
    const u64 row = blockIdx.x;
    const u64 i2 = row % d2, i1 = (row / d2) % d1, i0 = row / (d2 * d1);
    const T *mr = mask + mstart + i0 * m0 + i1 * m1 + i2 * m2;
    const T *sr = s + row * t;
    T *pr = p + row * t;
    float mx = -INFINITY;
    for (u64 j = threadIdx.x; j < t; j += blockDim.x) mx = fmaxf(mx, to_f(sr[j]) * scale + to_f(mr[j * m3]));
    mx = block_max(mx, sh);
    // A row masked everywhere (every z = −∞, as an f32::MIN mask becomes in bf16/f16) gives
    // zeros rather than NaN.
    if (mx == -INFINITY) mx = 0.0f;
    float sum = 0.0f;
    for (u64 j = threadIdx.x; j < t; j += blockDim.x) sum += expf(to_f(sr[j]) * scale + to_f(mr[j * m3]) - mx);
    sum = block_sum(sum, sh);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (u64 j = threadIdx.x; j < t; j += blockDim.x)
        pr[j] = from_f<T>(expf(to_f(sr[j]) * scale + to_f(mr[j * m3]) - mx) * inv);
}

// ds = scale · p · (g − Σ g·p) per row; p and g contiguous.
template <typename T> __device__ void masked_softmax_bwd(const T *p, const T *g, T *ds, u64 t, float scale) {
    __shared__ float sh[32];
    const T *pr = p + blockIdx.x * t;
    const T *gr = g + blockIdx.x * t;
    T *dr = ds + blockIdx.x * t;
    float dot = 0.0f;
    for (u64 j = threadIdx.x; j < t; j += blockDim.x) dot += to_f(pr[j]) * to_f(gr[j]);
    dot = block_sum(dot, sh);
    for (u64 j = threadIdx.x; j < t; j += blockDim.x)
        dr[j] = from_f<T>(scale * to_f(pr[j]) * (to_f(gr[j]) - dot));
}

// ---- RoPE (HF rotate-half) of a strided (d0, d1, d2, d) x into a contiguous y; cos and sin
// strided (broadcast dimensions have stride 0). One thread per rotated pair (row, k < d/2).
struct Off4 {
    u64 start, s0, s1, s2, s3;
};

__device__ __forceinline__ u64 row_off(const Off4 &o, u64 row, u64 d1, u64 d2) {
    const u64 i2 = row % d2, i1 = (row / d2) % d1, i0 = row / (d2 * d1);
    return o.start + i0 * o.s0 + i1 * o.s1 + i2 * o.s2;
}

template <typename T>
__device__ void rope_fwd(const T *x, const T *cs, const T *sn, T *y, u64 n_pairs, u64 d1, u64 d2, u64 d,
                         Off4 xo, Off4 co, Off4 so) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_pairs) return;
    const u64 half = d / 2, row = i / half, k = i % half;
    const u64 xb = row_off(xo, row, d1, d2), cb = row_off(co, row, d1, d2), sb = row_off(so, row, d1, d2);
    const float x1 = to_f(x[xb + k * xo.s3]), x2 = to_f(x[xb + (k + half) * xo.s3]);
    y[row * d + k] = from_f<T>(x1 * to_f(cs[cb + k * co.s3]) - x2 * to_f(sn[sb + k * so.s3]));
    y[row * d + k + half] =
        from_f<T>(x2 * to_f(cs[cb + (k + half) * co.s3]) + x1 * to_f(sn[sb + (k + half) * so.s3]));
}

// dx[k] = g[k]·cos[k] + g[k+½]·sin[k+½], dx[k+½] = g[k+½]·cos[k+½] − g[k]·sin[k]; g contiguous.
template <typename T>
__device__ void rope_bwd(const T *g, const T *cs, const T *sn, T *dx, u64 n_pairs, u64 d1, u64 d2, u64 d,
                         Off4 co, Off4 so) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_pairs) return;
    const u64 half = d / 2, row = i / half, k = i % half;
    const u64 cb = row_off(co, row, d1, d2), sb = row_off(so, row, d1, d2);
    const float g1 = to_f(g[row * d + k]), g2 = to_f(g[row * d + k + half]);
    dx[row * d + k] = from_f<T>(g1 * to_f(cs[cb + k * co.s3]) + g2 * to_f(sn[sb + (k + half) * so.s3]));
    dx[row * d + k + half] = from_f<T>(g2 * to_f(cs[cb + (k + half) * co.s3]) - g1 * to_f(sn[sb + k * so.s3]));
}

// ---- SwiGLU: y = silu(g)·u; dg = grad·u·σ(g)·(1 + g·(1 − σ(g))), du = grad·g·σ(g).
template <typename T> __device__ void swiglu_fwd(const T *g, const T *u, T *y, u64 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gv = to_f(g[i]);
    y[i] = from_f<T>(gv / (1.0f + expf(-gv)) * to_f(u[i]));
}

// dg in out[0..n], du (when DU) in out[n..2n].
template <typename T, bool DU> __device__ void swiglu_bwd(const T *g, const T *u, const T *grad, T *out, u64 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gv = to_f(g[i]), uv = to_f(u[i]), gr = to_f(grad[i]);
    const float s = 1.0f / (1.0f + expf(-gv));
    out[i] = from_f<T>(gr * uv * s * (1.0f + gv * (1.0f - s)));
    if (DU) out[n + i] = from_f<T>(gr * gv * s);
}

// ---- y = x·m elementwise (dropout's constant mask, forward and backward).
template <typename T> __device__ void mul_const(const T *x, const T *m, T *y, u64 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = from_f<T>(to_f(x[i]) * to_f(m[i]));
}

#define INSTANTIATE(T, SFX)                                                                          \
    extern "C" __global__ void rms_norm_fwd_##SFX(const T *x, const T *w, T *y, u64 h, float eps) {  \
        rms_norm_fwd<T>(x, w, y, h, eps);                                                            \
    }                                                                                                \
    extern "C" __global__ void rms_norm_bwd_##SFX(const T *x, const T *w, const T *g, T *dx, u64 h,  \
                                                  float eps) {                                       \
        rms_norm_bwd<T>(x, w, g, dx, h, eps);                                                        \
    }                                                                                                \
    extern "C" __global__ void rms_norm_rrow_##SFX(const T *x, float *rrow, u64 h, float eps) {      \
        rms_norm_rrow<T>(x, rrow, h, eps);                                                           \
    }                                                                                                \
    extern "C" __global__ void rms_norm_dw_##SFX(const T *x, const T *g, const float *rrow,          \
                                                 float *dw, u64 rows, u64 h, u64 rows_per_block) {   \
        rms_norm_dw<T>(x, g, rrow, dw, rows, h, rows_per_block);                                     \
    }                                                                                                \
    extern "C" __global__ void cast_from_f32_##SFX(const float *src, T *dst, u64 n) {                \
        cast_from_f32<T>(src, dst, n);                                                               \
    }                                                                                                \
    extern "C" __global__ void masked_softmax_fwd_##SFX(const T *s, const T *mask, T *p, u64 d1,     \
                                                        u64 d2, u64 t, u64 mstart, u64 m0, u64 m1,   \
                                                        u64 m2, u64 m3, float scale) {               \
        masked_softmax_fwd<T>(s, mask, p, d1, d2, t, mstart, m0, m1, m2, m3, scale);                 \
    }                                                                                                \
    extern "C" __global__ void masked_softmax_bwd_##SFX(const T *p, const T *g, T *ds, u64 t,        \
                                                        float scale) {                               \
        masked_softmax_bwd<T>(p, g, ds, t, scale);                                                   \
    }                                                                                                \
    extern "C" __global__ void rope_fwd_##SFX(const T *x, const T *cs, const T *sn, T *y,           \
                                              u64 n_pairs, u64 d1, u64 d2, u64 d, Off4 xo, Off4 co,  \
                                              Off4 so) {                                             \
        rope_fwd<T>(x, cs, sn, y, n_pairs, d1, d2, d, xo, co, so);                                   \
    }                                                                                                \
    extern "C" __global__ void rope_bwd_##SFX(const T *g, const T *cs, const T *sn, T *dx,          \
                                              u64 n_pairs, u64 d1, u64 d2, u64 d, Off4 co,           \
                                              Off4 so) {                                             \
        rope_bwd<T>(g, cs, sn, dx, n_pairs, d1, d2, d, co, so);                                      \
    }                                                                                                \
    extern "C" __global__ void swiglu_fwd_##SFX(const T *g, const T *u, T *y, u64 n) {               \
        swiglu_fwd<T>(g, u, y, n);                                                                   \
    }                                                                                                \
    extern "C" __global__ void swiglu_bwd_##SFX(const T *g, const T *u, const T *grad, T *out,       \
                                                u64 n) {                                             \
        swiglu_bwd<T, true>(g, u, grad, out, n);                                                     \
    }                                                                                                \
    extern "C" __global__ void swiglu_bwd_dg_##SFX(const T *g, const T *u, const T *grad, T *out,    \
                                                   u64 n) {                                          \
        swiglu_bwd<T, false>(g, u, grad, out, n);                                                    \
    }                                                                                                \
    extern "C" __global__ void mul_const_##SFX(const T *x, const T *m, T *y, u64 n) {                \
        mul_const<T>(x, m, y, n);                                                                    \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
