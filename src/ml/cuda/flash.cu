// CUDA kernels of coin's blocked (flash) attention (src/ml/flash.rs): the forward with an online
// softmax over key blocks, saving each query row's running maximum m and sum l, and the
// backward that recomputes each block's probabilities from q, k, m and l (FlashAttention-2, Dao
// 2023, algorithm 2). Semantics as the CPU op: q (b, heads, s, d), k and v (b, kv_heads, t, d)
// with heads a multiple of kv_heads (grouped heads read their shared key head, nothing is
// expanded; keys masked below -FLT_MAX/2 skipped where that changes no value), an optional
// additive f32 mask addressed by (batch, head, query) strides (0 for a
// broadcast dimension; keys contiguous), x = q·k·scale + mask clamped below at -FLT_MAX so that a
// -inf mask (f32::MIN rounded to bf16/f16) acts as f32::MIN does. A query row that sees no key
// (every x = -FLT_MAX) gets uniform probabilities over all t keys, as the composed ops give.
// Instantiated for f32, bf16 and f16 storage (suffixes _f32, _bf16, _f16); every load is widened
// to f32, all products, sums and exponentials run in f32, only stored results are rounded.
// build.rs compiles this file to PTX with nvcc under the `cuda` feature; src/ml/flash_cuda.rs
// loads it through candle's CudaDevice::get_or_load_custom_func and launches the kernels.
//
// Head dimension d ≤ FL_DMAX (128). Shared memory is dynamic and stays under 48 KiB.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <float.h>

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

#define FULL 0xffffffffu
#define FL_WARPS 4               // warps per block (128 threads)
#define FL_RPW 4                 // query rows per warp in the forward
#define FL_BR (FL_WARPS * FL_RPW) // query rows per forward block
#define FL_BC 32                 // keys per forward tile (one per lane)
#define FL_DMAX 128              // largest head dimension
#define FL_DPL (FL_DMAX / 32)    // output values per lane
#define FB_BC 16                 // keys per backward block (two lanes per key)

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

// The masked, scaled score of query row i (batch bi, head h) and key c.
__device__ __forceinline__ float masked(float dot, float scale, const float *mask, u64 has_mask, u64 bi,
                                        u64 h, u64 i, u64 c, u64 ms_b, u64 ms_h, u64 ms_s) {
    float x = dot * scale;
    if (has_mask) x += mask[bi * ms_b + h * ms_h + i * ms_s + c];
    return fmaxf(x, -FLT_MAX);
}

// ---- Forward. Grid (⌈s/FL_BR⌉, b·heads), FL_WARPS·32 threads; each warp keeps FL_RPW query rows
// (running m, l and the unnormalised output in registers, d values spread over the lanes) and
// walks the key tiles, lane c scoring key j0 + c. Writes out (b·heads·s rows of d + 2 f32): the
// output row O = acc / l, then m and l.
template <typename T>
__device__ void flash_fwd(const T *q, const T *k, const T *v, const float *mask, float *out, u64 heads,
                          u64 kv_heads, u64 s, u64 t, u64 d, u64 has_mask, u64 ms_b, u64 ms_h, u64 ms_s,
                          float scale) {
    extern __shared__ float sm[];
    float *qs = sm;                     // FL_BR × d
    float *ks = qs + FL_BR * d;         // FL_BC × (d + 1), padded against bank conflicts
    float *vs = ks + FL_BC * (d + 1);   // FL_BC × d
    const u64 bh = blockIdx.y, bi = bh / heads, h = bh % heads;
    const u64 kvh = h / (heads / kv_heads);
    const u64 i0 = (u64)blockIdx.x * FL_BR;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T *qb = q + bh * s * d;
    const T *kb = k + (bi * kv_heads + kvh) * t * d;
    const T *vb = v + (bi * kv_heads + kvh) * t * d;
    for (u64 x = threadIdx.x; x < FL_BR * d; x += blockDim.x) {
        const u64 r = x / d, j = x % d;
        qs[x] = i0 + r < s ? to_f(qb[(i0 + r) * d + j]) : 0.0f;
    }
    float m[FL_RPW], l[FL_RPW], acc[FL_RPW][FL_DPL];
#pragma unroll
    for (int rr = 0; rr < FL_RPW; ++rr) {
        m[rr] = -FLT_MAX;
        l[rr] = 0.0f;
#pragma unroll
        for (int u = 0; u < FL_DPL; ++u) acc[rr][u] = 0.0f;
    }
    for (u64 j0 = 0; j0 < t; j0 += FL_BC) {
        // Skip a tile whose keys every row of the block has masked (≤ -FLT_MAX/2: the causal
        // future, padding) when every row has already seen a key: such keys contribute
        // exp(x − m) = 0 exactly. A row that has seen nothing yet (m = -FLT_MAX) must take them
        // (it may see no key at all, and then gets uniform probabilities over all t keys).
        int skip = has_mask != 0;
#pragma unroll
        for (int rr = 0; rr < FL_RPW; ++rr)
            if (i0 + (u64)warp * FL_RPW + rr < s && !(m[rr] > -0.5f * FLT_MAX)) skip = 0;
        if (skip) {
            for (u64 x = threadIdx.x; x < FL_BR * FL_BC; x += blockDim.x) {
                const u64 i = i0 + x / FL_BC, c = j0 + x % FL_BC;
                if (i < s && c < t && mask[bi * ms_b + h * ms_h + i * ms_s + c] > -0.5f * FLT_MAX) skip = 0;
            }
        }
        // Also the barrier after which the previous tile is consumed (and the q tile written).
        if (__syncthreads_and(skip)) continue;
        for (u64 x = threadIdx.x; x < FL_BC * d; x += blockDim.x) {
            const u64 c = x / d, j = x % d;
            const bool in = j0 + c < t;
            ks[c * (d + 1) + j] = in ? to_f(kb[(j0 + c) * d + j]) : 0.0f;
            vs[x] = in ? to_f(vb[(j0 + c) * d + j]) : 0.0f;
        }
        __syncthreads();
        const u64 c = j0 + lane;
#pragma unroll
        for (int rr = 0; rr < FL_RPW; ++rr) {
            const u64 r = (u64)warp * FL_RPW + rr, i = i0 + r;
            if (i >= s) continue; // the same for the whole warp
            float x = -INFINITY;  // keys past t take no part
            if (c < t) {
                float dot = 0.0f;
                for (u64 j = 0; j < d; ++j) dot += qs[r * d + j] * ks[lane * (d + 1) + j];
                x = masked(dot, scale, mask, has_mask, bi, h, i, c, ms_b, ms_h, ms_s);
            }
            const float m_new = fmaxf(m[rr], warp_max(x));
            const float p = c < t ? expf(x - m_new) : 0.0f;
            const float alpha = expf(m[rr] - m_new);
            l[rr] = l[rr] * alpha + warp_sum(p);
            m[rr] = m_new;
#pragma unroll
            for (int u = 0; u < FL_DPL; ++u) acc[rr][u] *= alpha;
            for (int cc = 0; cc < FL_BC; ++cc) {
                const float pc = __shfl_sync(FULL, p, cc);
#pragma unroll
                for (int u = 0; u < FL_DPL; ++u) {
                    const u64 j = (u64)lane + 32u * u;
                    if (j < d) acc[rr][u] += pc * vs[cc * d + j];
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < FL_RPW; ++rr) {
        const u64 i = i0 + (u64)warp * FL_RPW + rr;
        if (i >= s) continue;
        float *o = out + (bh * s + i) * (d + 2);
        const float inv = 1.0f / l[rr];
#pragma unroll
        for (int u = 0; u < FL_DPL; ++u) {
            const u64 j = (u64)lane + 32u * u;
            if (j < d) o[j] = acc[rr][u] * inv;
        }
        if (lane == 0) {
            o[d] = m[rr];
            o[d + 1] = l[rr];
        }
    }
}

// ---- D = rowsum(dO ⊙ O) per query row (f32), one warp per row; grid ⌈rows/FL_WARPS⌉.
template <typename T> __device__ void flash_bwd_dot(const T *g, const T *o, float *dd, u64 rows, u64 d) {
    const u64 row = (u64)blockIdx.x * FL_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return; // the same for the whole warp
    float acc = 0.0f;
    for (u64 j = lane; j < d; j += 32) acc += to_f(g[row * d + j]) * to_f(o[row * d + j]);
    acc = warp_sum(acc);
    if (lane == 0) dd[row] = acc;
}

// ---- Backward. Grid (⌈t/FB_BC⌉, b·kv_heads), FL_WARPS·32 threads: the block owns FB_BC keys of
// one key head (k, v tiles and their dk, dv accumulators in shared memory) and walks every query
// row of the heads that share it, one row per warp at a time. Lanes c and c + 16 score key c over
// the two halves of d. Per row: P = exp(x − m)/l, dP = dO·v, dS = P·(dP − D)·scale; dv += P·dO and
// dk += dS·q (shared atomics across warps), dq += dS·k (global f32 atomics across key blocks).
// dk and dv are written as T at out[dk_off…] and out[dv_off…] in (b, kv_heads, t, d) order.
template <typename T>
__device__ void flash_bwd(const T *q, const T *k, const T *v, const T *g, const float *ms, const float *ls,
                          const float *dd, const float *mask, float *dq, T *out, u64 dk_off, u64 dv_off,
                          u64 heads, u64 kv_heads, u64 s, u64 t, u64 d, u64 has_mask, u64 ms_b, u64 ms_h,
                          u64 ms_s, float scale) {
    extern __shared__ float sm[];
    float *ks = sm;                   // FB_BC × (d + 1)
    float *vs = ks + FB_BC * (d + 1); // FB_BC × (d + 1)
    float *dks = vs + FB_BC * (d + 1); // FB_BC × d
    float *dvs = dks + FB_BC * d;     // FB_BC × d
    float *qw = dvs + FB_BC * d;      // FL_WARPS × d: each warp's query row
    float *gw = qw + FL_WARPS * d;    // FL_WARPS × d: each warp's output-gradient row
    const u64 bk = blockIdx.y, bi = bk / kv_heads, kvh = bk % kv_heads;
    const u64 rep = heads / kv_heads;
    const u64 j0 = (u64)blockIdx.x * FB_BC;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T *kb = k + bk * t * d;
    const T *vb = v + bk * t * d;
    for (u64 x = threadIdx.x; x < FB_BC * d; x += blockDim.x) {
        const u64 c = x / d, j = x % d;
        const bool in = j0 + c < t;
        ks[c * (d + 1) + j] = in ? to_f(kb[(j0 + c) * d + j]) : 0.0f;
        vs[c * (d + 1) + j] = in ? to_f(vb[(j0 + c) * d + j]) : 0.0f;
        dks[x] = 0.0f;
        dvs[x] = 0.0f;
    }
    __syncthreads();
    const int c = lane & (FB_BC - 1);
    const u64 half = d / 2;
    const u64 ja = lane < FB_BC ? 0 : half, jb = lane < FB_BC ? half : d;
    const u64 key = j0 + c;
    float *qr = qw + warp * d, *gr = gw + warp * d;
    for (u64 x = warp; x < rep * s; x += FL_WARPS) { // the same for the whole warp
        const u64 h = kvh * rep + x / s, i = x % s;
        const u64 row = (bi * heads + h) * s + i;
        // A row that sees some key (m > -FLT_MAX/2) gets P = 0 exactly from the keys it has
        // masked (≤ -FLT_MAX/2): when all of the block's keys are, it adds nothing.
        if (has_mask && ms[row] > -0.5f * FLT_MAX) {
            const bool hidden = key >= t || mask[bi * ms_b + h * ms_h + i * ms_s + key] <= -0.5f * FLT_MAX;
            if (__all_sync(FULL, hidden)) continue; // ms[row] is the same for the whole warp
        }
        for (u64 j = lane; j < d; j += 32) {
            qr[j] = to_f(q[row * d + j]);
            gr[j] = to_f(g[row * d + j]);
        }
        __syncwarp();
        float sdot = 0.0f, pdot = 0.0f;
        for (u64 j = ja; j < jb; ++j) {
            sdot += qr[j] * ks[c * (d + 1) + j];
            pdot += gr[j] * vs[c * (d + 1) + j];
        }
        sdot += __shfl_xor_sync(FULL, sdot, FB_BC);
        pdot += __shfl_xor_sync(FULL, pdot, FB_BC);
        float p = 0.0f, ds = 0.0f;
        if (key < t) {
            const float xs = masked(sdot, scale, mask, has_mask, bi, h, i, key, ms_b, ms_h, ms_s);
            p = expf(xs - ms[row]) / ls[row];
            ds = p * (pdot - dd[row]) * scale;
        }
        float pv[FB_BC], dsv[FB_BC];
#pragma unroll
        for (int cc = 0; cc < FB_BC; ++cc) {
            pv[cc] = __shfl_sync(FULL, p, cc);
            dsv[cc] = __shfl_sync(FULL, ds, cc);
        }
        for (u64 j = lane; j < d; j += 32) {
            const float qj = qr[j], gj = gr[j];
            float dqj = 0.0f;
#pragma unroll
            for (int cc = 0; cc < FB_BC; ++cc) {
                if (pv[cc] != 0.0f) atomicAdd(dvs + cc * d + j, pv[cc] * gj);
                if (dsv[cc] != 0.0f) atomicAdd(dks + cc * d + j, dsv[cc] * qj);
                dqj += dsv[cc] * ks[cc * (d + 1) + j];
            }
            if (dqj != 0.0f) atomicAdd(dq + row * d + j, dqj);
        }
        __syncwarp(); // the row buffers are read before the next row overwrites them
    }
    __syncthreads();
    for (u64 x = threadIdx.x; x < FB_BC * d; x += blockDim.x) {
        const u64 cc = x / d, j = x % d;
        if (j0 + cc >= t) continue;
        const u64 at = (bk * t + j0 + cc) * d + j;
        out[dk_off + at] = from_f<T>(dks[x]);
        out[dv_off + at] = from_f<T>(dvs[x]);
    }
}

// ---- dq (f32) → out[0..n] as T.
template <typename T> __device__ void flash_cast(const float *src, T *dst, u64 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = from_f<T>(src[i]);
}

#define INSTANTIATE(T, SFX)                                                                          \
    extern "C" __global__ void flash_fwd_##SFX(const T *q, const T *k, const T *v, const float *mask, \
                                               float *out, u64 heads, u64 kv_heads, u64 s, u64 t,    \
                                               u64 d, u64 has_mask, u64 ms_b, u64 ms_h, u64 ms_s,    \
                                               float scale) {                                        \
        flash_fwd<T>(q, k, v, mask, out, heads, kv_heads, s, t, d, has_mask, ms_b, ms_h, ms_s,       \
                     scale);                                                                         \
    }                                                                                                \
    extern "C" __global__ void flash_bwd_dot_##SFX(const T *g, const T *o, float *dd, u64 rows,      \
                                                   u64 d) {                                          \
        flash_bwd_dot<T>(g, o, dd, rows, d);                                                         \
    }                                                                                                \
    extern "C" __global__ void flash_bwd_##SFX(                                                      \
        const T *q, const T *k, const T *v, const T *g, const float *ms, const float *ls,            \
        const float *dd, const float *mask, float *dq, T *out, u64 dk_off, u64 dv_off, u64 heads,    \
        u64 kv_heads, u64 s, u64 t, u64 d, u64 has_mask, u64 ms_b, u64 ms_h, u64 ms_s,               \
        float scale) {                                                                               \
        flash_bwd<T>(q, k, v, g, ms, ls, dd, mask, dq, out, dk_off, dv_off, heads, kv_heads, s, t,   \
                     d, has_mask, ms_b, ms_h, ms_s, scale);                                          \
    }                                                                                                \
    extern "C" __global__ void flash_cast_##SFX(const float *src, T *dst, u64 n) {                   \
        flash_cast<T>(src, dst, n);                                                                  \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
