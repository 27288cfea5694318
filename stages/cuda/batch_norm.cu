// CUDA kernels of pipe's fused batch norm (+ ReLU) and residual add + ReLU
// (stages/src/nn/batch_norm.rs has the maths, the CPU twins and the orchestration).
//
// An input x of shape (b, c, ...) is read as (b, c, l): element (img, ch, p) sits at
// (img * c + ch) * l + p. Per-channel sums are accumulated in double, in a fixed order (a fixed
// split of each channel's b * l values into `gridDim.y` parts, a fixed tree inside a block,
// the parts added in order), so results do not depend on scheduling.
//
// The kernels use only what CUDA guarantees to every thread of a block (shared memory and
// __syncthreads, no warp-synchronous code), so stages/cuda/emulate.hpp can run this very file
// on the CPU: the pipe-stages test `cuda_kernels_emulated` does, with check_kernels.cpp.
//
// Compiled to PTX by stages/build.rs in a `cuda` build (nvcc, for CUDA_COMPUTE_CAP).

#ifndef PIPE_EMULATED
#define PIPE_DEVICE __device__
#else
#define PIPE_DEVICE
#endif

// Threads per block of every kernel below (the Rust side launches with this many).
#define BN_THREADS 256

// Sizes and indices are 32-bit (a 64-bit division per element would cost about as much as the
// memory traffic): the Rust side sends only tensors of at most 2^31 elements here, so no index
// or grid-stride step can wrap.
typedef unsigned int u32;

// The block's sum of (a, b) into s1[0], s2[0] (a fixed tree). Every thread must call it.
PIPE_DEVICE void block_sum2(double* s1, double* s2, double a, double b) {
    const int t = threadIdx.x;
    s1[t] = a;
    s2[t] = b;
    __syncthreads();
    for (int w = BN_THREADS / 2; w > 0; w >>= 1) {
        if (t < w) {
            s1[t] += s1[t + w];
            s2[t] += s2[t + w];
        }
        __syncthreads();
    }
}

// The values [start, end) of this block's part of a channel's n = b * l values.
PIPE_DEVICE void part_range(u32 n, u32* start, u32* end) {
    const u32 parts = gridDim.y;
    const u32 chunk = (n + parts - 1) / parts;
    *start = blockIdx.y * chunk;
    *end = *start + chunk < n ? *start + chunk : n;
}

// Channel ch's two sums over its `parts` partial sums, added in order.
PIPE_DEVICE void sum_parts(const double* part, u32 ch, u32 parts, double* s1, double* s2) {
    double a = 0.0, b = 0.0;
    for (u32 s = 0; s < parts; ++s) {
        a += part[(ch * parts + s) * 2];
        b += part[(ch * parts + s) * 2 + 1];
    }
    *s1 = a;
    *s2 = b;
}

// grid (c, parts), block BN_THREADS: part[(ch * parts + s) * 2 + {0, 1}] =
// (Σ (x - k), Σ (x - k)²) over part s of channel ch, shifted by k = x[0, ch, 0] (the channel's
// first value: the variance then loses nothing to cancellation).
extern "C" __global__ void bn_moments_partial(const float* x, u32 b, u32 c, u32 l,
                                              double* part) {
    __shared__ double s1[BN_THREADS];
    __shared__ double s2[BN_THREADS];
    const u32 ch = blockIdx.x;
    u32 start, end;
    part_range(b * l, &start, &end);
    const double k = (double)x[ch * l];
    double a1 = 0.0, a2 = 0.0;
    for (u32 i = start + threadIdx.x; i < end; i += BN_THREADS) {
        const u32 img = i / l;
        const double v = (double)x[(img * c + ch) * l + (i - img * l)] - k;
        a1 += v;
        a2 += v * v;
    }
    block_sum2(s1, s2, a1, a2);
    if (threadIdx.x == 0) {
        const u32 at = (ch * gridDim.y + blockIdx.y) * 2;
        part[at] = s1[0];
        part[at + 1] = s2[0];
    }
}

// One thread per channel: out[ch] = mean, out[c + ch] = biased variance, from the `parts`
// partial shifted sums of bn_moments_partial over m = b * l values.
extern "C" __global__ void bn_moments_finalize(const double* part, const float* x, u32 c, u32 l,
                                               u32 parts, double m, double* out) {
    const u32 ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) {
        return;
    }
    double s1, s2;
    sum_parts(part, ch, parts, &s1, &s2);
    const double m1 = s1 / m, m2 = s2 / m;
    const double var = m2 - m1 * m1;
    out[ch] = (double)x[ch * l] + m1;
    out[c + ch] = var > 0.0 ? var : 0.0;
}

// y = scale[ch] * x + shift[ch], then max(·, 0) when relu (NaN passes, as torch's ReLU), with
// coef = [scale (c), shift (c)]. Any 1-D grid (grid-stride loop).
extern "C" __global__ void bn_apply(const float* x, const float* coef, u32 n, u32 c, u32 l,
                                    int relu, float* y) {
    const u32 stride = BN_THREADS * gridDim.x;
    for (u32 i = blockIdx.x * BN_THREADS + threadIdx.x; i < n; i += stride) {
        const u32 ch = (i / l) % c;
        const float r = x[i] * coef[ch] + coef[c + ch];
        y[i] = (relu && r <= 0.0f) ? 0.0f : r;
    }
}

// grid (c, parts), block BN_THREADS: part[(ch * parts + s) * 2 + {0, 1}] =
// (Σ g, Σ g · (x - mean[ch])) over part s of channel ch, with g = dout · [out > 0] when relu,
// dout otherwise.
extern "C" __global__ void bn_grad_partial(const float* x, const float* out, const float* dout,
                                           const double* mean, u32 b, u32 c, u32 l, int relu,
                                           double* part) {
    __shared__ double s1[BN_THREADS];
    __shared__ double s2[BN_THREADS];
    const u32 ch = blockIdx.x;
    u32 start, end;
    part_range(b * l, &start, &end);
    const double mu = mean[ch];
    double a1 = 0.0, a2 = 0.0;
    for (u32 i = start + threadIdx.x; i < end; i += BN_THREADS) {
        const u32 img = i / l;
        const u32 at = (img * c + ch) * l + (i - img * l);
        const double g = (relu && out[at] <= 0.0f) ? 0.0 : (double)dout[at];
        a1 += g;
        a2 += g * ((double)x[at] - mu);
    }
    block_sum2(s1, s2, a1, a2);
    if (threadIdx.x == 0) {
        const u32 at = (ch * gridDim.y + blockIdx.y) * 2;
        part[at] = s1[0];
        part[at + 1] = s2[0];
    }
}

// One thread per channel: out[ch] = Σ_s part[ch, s, 0], out[c + ch] = Σ_s part[ch, s, 1].
extern "C" __global__ void bn_sum_partials(const double* part, u32 c, u32 parts, double* out) {
    const u32 ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) {
        return;
    }
    double s1, s2;
    sum_parts(part, ch, parts, &s1, &s2);
    out[ch] = s1;
    out[c + ch] = s2;
}

// dx = k1[ch] * g + (k2[ch] * x + k3[ch]) in train mode, k1[ch] * g in eval mode, with g as in
// bn_grad_partial and coef = [k1 (c), k2 (c), k3 (c)]. Any 1-D grid.
extern "C" __global__ void bn_dx(const float* x, const float* out, const float* dout,
                                 const float* coef, u32 n, u32 c, u32 l, int relu, int train,
                                 float* dx) {
    const u32 stride = BN_THREADS * gridDim.x;
    for (u32 i = blockIdx.x * BN_THREADS + threadIdx.x; i < n; i += stride) {
        const u32 ch = (i / l) % c;
        const float g = (relu && out[i] <= 0.0f) ? 0.0f : dout[i];
        const float k1 = coef[ch];
        dx[i] = train ? k1 * g + (coef[c + ch] * x[i] + coef[2 * c + ch]) : k1 * g;
    }
}

// y = max(a + b, 0) (NaN passes). Any 1-D grid.
extern "C" __global__ void add_relu(const float* a, const float* b, u32 n, float* y) {
    const u32 stride = BN_THREADS * gridDim.x;
    for (u32 i = blockIdx.x * BN_THREADS + threadIdx.x; i < n; i += stride) {
        const float r = a[i] + b[i];
        y[i] = r <= 0.0f ? 0.0f : r;
    }
}

// g = dout · [out > 0]: the gradient of a ReLU output `out`. Any 1-D grid.
extern "C" __global__ void relu_grad(const float* out, const float* dout, u32 n, float* g) {
    const u32 stride = BN_THREADS * gridDim.x;
    for (u32 i = blockIdx.x * BN_THREADS + threadIdx.x; i < n; i += stride) {
        g[i] = out[i] <= 0.0f ? 0.0f : dout[i];
    }
}
