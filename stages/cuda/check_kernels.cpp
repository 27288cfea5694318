// Runs the kernels of batch_norm.cu on the CPU (emulate.hpp) and checks every output against a
// direct double-precision computation of what it should be. Exit status 0 when all agree.
//
//   c++ -std=c++20 -O1 -pthread stages/cuda/check_kernels.cpp -o check && ./check
//
// (The pipe-stages test `cuda_kernels_emulated` does this.)

#include "emulate.hpp"

#include "batch_norm.cu"

#include <cmath>
#include <cstdlib>
#include <limits>

namespace {

int failures = 0;

void expect_close(const char* what, double got, double want, double tol) {
    const double err = std::fabs(got - want) / std::fmax(std::fabs(want), 1.0);
    if (!(err <= tol) && !(std::isnan(got) && std::isnan(want))) {
        std::printf("FAIL %s: got %.17g, want %.17g (rel. error %.3g > %.3g)\n", what, got, want,
                    err, tol);
        ++failures;
    }
}

// offset + scale * sin(0.37 i + phase), as float.
std::vector<float> wave(size_t n, double phase, double scale, double offset) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) {
        v[i] = (float)(offset + scale * std::sin(0.37 * (double)i + phase));
    }
    return v;
}

unsigned int blocks_for(long long n) {
    const long long b = (n + BN_THREADS - 1) / BN_THREADS;
    return (unsigned int)(b < 3 ? b : 3);  // few blocks: the grid-stride loops go round
}

void check_shape(long long b, int c, long long l, unsigned int parts, bool relu, bool train) {
    char what[160];
    const long long n = b * c * l;
    const double m = (double)(b * l);
    std::vector<float> x = wave(n, 0.1, 2.0, 0.3);
    std::vector<float> out = wave(n, 0.9, 1.0, 0.1);
    std::vector<float> dout = wave(n, 2.9, 1.0, 0.2);
    if (relu) {
        for (long long i = 0; i < n; i += 7) {
            out[i] = 0.0f;  // exact zeros: no gradient there
        }
        out[n / 2] = std::numeric_limits<float>::quiet_NaN();  // a NaN output passes its gradient
    }
    auto at = [&](long long img, int ch, long long p) { return (img * c + ch) * l + p; };
    std::snprintf(what, sizeof what, "(b %lld, c %d, l %lld, parts %u, relu %d, train %d)", b, c,
                  l, parts, relu, train);

    // Moments.
    std::vector<double> part((size_t)c * parts * 2, -1.0), mv(2 * (size_t)c, -1.0);
    launch(bn_moments_partial, dim3{(unsigned)c, parts, 1}, dim3{BN_THREADS, 1, 1}, x.data(), b,
           c, l, part.data());
    launch(bn_moments_finalize, dim3{(unsigned)(c + BN_THREADS - 1) / BN_THREADS, 1, 1},
           dim3{BN_THREADS, 1, 1}, (const double*)part.data(), (const float*)x.data(), c, l,
           (int)parts, m, mv.data());
    std::vector<double> mean(c), inv(c);
    for (int ch = 0; ch < c; ++ch) {
        double s = 0.0;
        for (long long img = 0; img < b; ++img)
            for (long long p = 0; p < l; ++p) s += x[at(img, ch, p)];
        const double mu = s / m;
        double v = 0.0;
        for (long long img = 0; img < b; ++img)
            for (long long p = 0; p < l; ++p) v += (x[at(img, ch, p)] - mu) * (x[at(img, ch, p)] - mu);
        v /= m;
        std::string w = std::string(what) + " mean";
        expect_close(w.c_str(), mv[ch], mu, 1e-12);
        w = std::string(what) + " var";
        expect_close(w.c_str(), mv[c + ch], v, 1e-12);
        mean[ch] = mu;
        inv[ch] = 1.0 / std::sqrt(v + 1e-5);
    }

    // Apply.
    std::vector<float> coef(2 * (size_t)c), y(n, -7.0f);
    float* scale = coef.data();
    float* shift = coef.data() + c;
    for (int ch = 0; ch < c; ++ch) {
        scale[ch] = (float)(0.8 + 0.1 * ch);
        shift[ch] = (float)(0.2 - 0.3 * ch);
    }
    launch(bn_apply, dim3{blocks_for(n), 1, 1}, dim3{BN_THREADS, 1, 1}, (const float*)x.data(),
           (const float*)coef.data(), n, c, l, (int)relu, y.data());
    for (long long img = 0; img < b; ++img)
        for (int ch = 0; ch < c; ++ch)
            for (long long p = 0; p < l; ++p) {
                const double r = (double)x[at(img, ch, p)] * scale[ch] + shift[ch];
                const double want = relu && r <= 0.0 ? 0.0 : r;
                std::string w = std::string(what) + " bn_apply";
                expect_close(w.c_str(), y[at(img, ch, p)], want, 1e-6);
            }

    // Gradient sums.
    std::vector<double> gpart((size_t)c * parts * 2, -1.0), sums(2 * (size_t)c, -1.0);
    launch(bn_grad_partial, dim3{(unsigned)c, parts, 1}, dim3{BN_THREADS, 1, 1},
           (const float*)x.data(), (const float*)out.data(), (const float*)dout.data(),
           (const double*)mean.data(), b, c, l, (int)relu, gpart.data());
    launch(bn_sum_partials, dim3{(unsigned)(c + BN_THREADS - 1) / BN_THREADS, 1, 1},
           dim3{BN_THREADS, 1, 1}, (const double*)gpart.data(), c, (int)parts, sums.data());
    auto g_of = [&](long long i) -> double {
        return relu && out[i] <= 0.0f ? 0.0 : (double)dout[i];  // NaN > 0 is false: passes
    };
    for (int ch = 0; ch < c; ++ch) {
        double sg = 0.0, sgx = 0.0;
        for (long long img = 0; img < b; ++img)
            for (long long p = 0; p < l; ++p) {
                const long long i = at(img, ch, p);
                sg += g_of(i);
                sgx += g_of(i) * (x[i] - mean[ch]);
            }
        std::string w = std::string(what) + " sum g";
        expect_close(w.c_str(), sums[ch], sg, 1e-12);
        w = std::string(what) + " sum g(x - mean)";
        expect_close(w.c_str(), sums[c + ch], sgx, 1e-12);
    }

    // dx.
    std::vector<float> kc(3 * (size_t)c), dx(n, -7.0f);
    float* k1 = kc.data();
    float* k2 = kc.data() + c;
    float* k3 = kc.data() + 2 * c;
    for (int ch = 0; ch < c; ++ch) {
        k1[ch] = (float)(0.5 + 0.25 * ch);
        k2[ch] = (float)(-0.1 * ch);
        k3[ch] = (float)(0.05 * ch - 0.1);
    }
    launch(bn_dx, dim3{blocks_for(n), 1, 1}, dim3{BN_THREADS, 1, 1}, (const float*)x.data(),
           (const float*)out.data(), (const float*)dout.data(), (const float*)kc.data(), n, c,
           l, (int)relu, (int)train, dx.data());
    for (long long img = 0; img < b; ++img)
        for (int ch = 0; ch < c; ++ch)
            for (long long p = 0; p < l; ++p) {
                const long long i = at(img, ch, p);
                const double want = train ? k1[ch] * g_of(i) + (k2[ch] * (double)x[i] + k3[ch])
                                          : k1[ch] * g_of(i);
                std::string w = std::string(what) + " bn_dx";
                expect_close(w.c_str(), dx[i], want, 1e-6);
            }

    // Residual add + ReLU and the ReLU gradient.
    std::vector<float> sum(n, -7.0f), rg(n, -7.0f);
    launch(add_relu, dim3{blocks_for(n), 1, 1}, dim3{BN_THREADS, 1, 1}, (const float*)x.data(),
           (const float*)dout.data(), n, sum.data());
    launch(relu_grad, dim3{blocks_for(n), 1, 1}, dim3{BN_THREADS, 1, 1}, (const float*)out.data(),
           (const float*)dout.data(), n, rg.data());
    for (long long i = 0; i < n; ++i) {
        const double r = (double)x[i] + dout[i];
        expect_close((std::string(what) + " add_relu").c_str(), sum[i], r <= 0.0 ? 0.0 : r, 1e-6);
        const double want = out[i] <= 0.0f ? 0.0 : (double)dout[i];
        expect_close((std::string(what) + " relu_grad").c_str(), rg[i], want, 0.0);
    }
}

}  // namespace

int main() {
    int cases = 0;
    // A conv feature map, split in 3 parts of 2.3 images; BatchNorm1d (l = 1) with more parts
    // than a block's worth of values and with one part; long channels (a part spans images);
    // fewer values than threads.
    const struct {
        long long b;
        int c;
        long long l;
        unsigned int parts;
    } shapes[] = {{7, 5, 49, 3}, {6, 3, 1, 4}, {300, 4, 1, 1}, {2, 2, 1000, 5}, {1, 3, 6, 2}};
    for (const auto& s : shapes) {
        for (int relu = 0; relu < 2; ++relu) {
            for (int train = 0; train < 2; ++train) {
                check_shape(s.b, s.c, s.l, s.parts, relu, train);
                ++cases;
            }
        }
    }
    if (failures > 0) {
        std::printf("%d check(s) failed\n", failures);
        return 1;
    }
    std::printf("all %d cases of the batch-norm kernels agree with the reference\n", cases);
    return 0;
}
