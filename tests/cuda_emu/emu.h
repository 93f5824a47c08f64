// A CPU emulation of the CUDA features src/ml/cuda/flash.cu uses, to run the kernels' own source
// on a machine without a GPU (tests/cuda_emu/flash_emu.cpp): every thread of a block is an OS
// thread, __syncthreads a barrier over the block, the warp intrinsics barriers over 32 threads
// exchanging values, atomicAdd a mutex. Blocks run one after another, so the dynamic shared
// memory is one global array. Slow and only for small shapes.
#pragma once
#include <barrier>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__

struct Dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;

// The dynamic shared memory (`extern __shared__ float sm[]` in the kernels).
inline float sm[1 << 15];

struct EmuBlock {
    std::barrier<> *block;
    std::vector<std::barrier<> *> warps;
    float xch[1024];
    int votes[1024];
};
inline EmuBlock *emu_block;
inline std::mutex emu_atomic;

inline int emu_tid() { return (int)threadIdx.x; }
inline std::barrier<> &emu_warp() { return *emu_block->warps[emu_tid() / 32]; }

inline void __syncthreads() { emu_block->block->arrive_and_wait(); }
inline int __syncthreads_and(int p) {
    emu_block->votes[emu_tid()] = p;
    emu_block->block->arrive_and_wait();
    int all = 1;
    for (unsigned i = 0; i < blockDim.x; ++i) all &= emu_block->votes[i] != 0;
    emu_block->block->arrive_and_wait();
    return all;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp().arrive_and_wait(); }
inline float __shfl_sync(unsigned, float v, int src) {
    const int base = emu_tid() & ~31;
    emu_block->xch[emu_tid()] = v;
    emu_warp().arrive_and_wait();
    const float r = emu_block->xch[base + (src & 31)];
    emu_warp().arrive_and_wait();
    return r;
}
inline float __shfl_xor_sync(unsigned m, float v, int o) { return __shfl_sync(m, v, (emu_tid() & 31) ^ o); }
inline int __all_sync(unsigned, int p) {
    const int base = emu_tid() & ~31;
    emu_block->votes[emu_tid()] = p;
    emu_warp().arrive_and_wait();
    int all = 1;
    for (int i = 0; i < 32; ++i) all &= emu_block->votes[base + i] != 0;
    emu_warp().arrive_and_wait();
    return all;
}
inline float atomicAdd(float *p, float v) {
    std::lock_guard<std::mutex> g(emu_atomic);
    const float old = *p;
    *p = old + v;
    return old;
}

// Run `kernel` over the grid, one block at a time, blockDim.x threads each (a multiple of 32).
inline void emu_launch(Dim3 grid, unsigned threads, const std::function<void()> &kernel) {
    gridDim = grid;
    blockDim = Dim3{threads, 1, 1};
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::barrier<> block(threads);
            std::vector<std::barrier<> *> warps;
            for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(new std::barrier<>(32));
            EmuBlock eb{&block, warps, {}, {}};
            emu_block = &eb;
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < threads; ++t)
                ts.emplace_back([&, t] {
                    threadIdx = Dim3{t, 0, 0};
                    blockIdx = Dim3{bx, by, 0};
                    kernel();
                });
            for (auto &t : ts) t.join();
            for (auto *w : warps) delete w;
        }
}
