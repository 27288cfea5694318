// A CPU emulation of the part of CUDA that stages/cuda/*.cu use, to run those very kernels on a
// machine without a GPU: each block's threads are real threads (std::thread) meeting at a real
// barrier for __syncthreads, blocks run one after another, and __shared__ arrays are statics
// (one block at a time uses them). It checks the kernels' logic (indexing, reductions, the
// barriers' placement: a missing __syncthreads is a data race here too); speed, memory
// coalescing and the PTX itself are a GPU's to check (the cuda_vs_cpu tests).
//
// Kernels must not rely on warp-synchronous execution, warp intrinsics or atomics.
#pragma once

#include <barrier>
#include <cstdio>
#include <functional>
#include <thread>
#include <vector>

#define PIPE_EMULATED 1
#define __global__
#define __shared__ static

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
inline thread_local std::barrier<>* pipe_emulated_barrier = nullptr;

inline void __syncthreads() { pipe_emulated_barrier->arrive_and_wait(); }

// kernel<<<grid, block>>>(args...), run to completion.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
    for (unsigned int by = 0; by < grid.y; ++by) {
        for (unsigned int bx = 0; bx < grid.x; ++bx) {
            std::barrier<> bar(block.x);
            std::vector<std::thread> threads;
            threads.reserve(block.x);
            for (unsigned int t = 0; t < block.x; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx = dim3{t, 0, 0};
                    blockIdx = dim3{bx, by, 0};
                    blockDim = block;
                    gridDim = grid;
                    pipe_emulated_barrier = &bar;
                    kernel(static_cast<P>(args)...);
                });
            }
            for (auto& th : threads) {
                th.join();
            }
        }
    }
}
