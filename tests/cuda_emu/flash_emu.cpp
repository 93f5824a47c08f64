// Runs the kernels of src/ml/cuda/flash.cu (their own source: the f32 instances through their
// extern "C" entries, the bf16 ones through the templates, with the device's rounding) on the CPU
// through emu.h and compares the output and dq, dk, dv with the textbook attention and its
// gradients in double on the same (rounded) inputs: grouped heads, causal + left-padding masks with rows that see no key (uniform
// probabilities, as the composed ops give), KV-cache shapes, no mask, head dimensions that are
// not multiples of 32. Build and run: scripts/flash-emu.sh. Exit 1 on any error above 1e-4 (f32)
// or 3e-2 (bf16: the output and gradients are stored rounded) relative to the reference's largest
// magnitude.
#include "emu.h"
#include "../../src/ml/cuda/flash.cu"

#include <algorithm>
#include <type_traits>
#include <cstdio>
#include <random>

typedef std::vector<float> Vf;
typedef std::vector<double> Vd;

struct Case { const char *name; u64 b, heads, kv, s, t, d, pad; bool masked; bool minus_inf; };

static double max_abs(const Vd &a) {
    double m = 0;
    for (double x : a) m = std::max(m, std::fabs(x));
    return m;
}

static int report(const char *c, const char *dt, double tol, const char *what, const Vf &got,
                  const Vd &want) {
    double err = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double e = std::fabs((double)got[i] - want[i]);
        err = std::isnan(e) ? INFINITY : std::max(err, e);
    }
    const double rel = err / std::max(max_abs(want), 1e-30);
    const bool ok = rel <= tol;
    std::printf("%-18s %-5s %-8s max_abs %-10.3e max_rel %-10.3e %s\n", c, dt, what, err, rel,
                ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
}

// The storage type's conversions (as the kernels' to_f / from_f).
template <typename T> static T store(float x) { return from_f<T>(x); }
template <typename T> static float load(T x) { return to_f(x); }

template <typename T> static int run(const Case &cs, const char *dt, double tol) {
    const u64 b = cs.b, H = cs.heads, KV = cs.kv, s = cs.s, t = cs.t, d = cs.d, rep = H / KV;
    const float scale = 1.0f / std::sqrt((float)d);
    std::mt19937 rng(7 + s * 131 + t);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    // Inputs rounded to T, so that the reference sees the values the kernels see.
    auto rnd = [&](size_t n) {
        Vf v(n);
        for (auto &x : v) x = load(store<T>(nd(rng)));
        return v;
    };
    auto as_t = [](const Vf &v) {
        std::vector<T> r(v.size());
        for (size_t i = 0; i < v.size(); ++i) r[i] = store<T>(v[i]);
        return r;
    };
    const Vf q = rnd(b * H * s * d), k = rnd(b * KV * t * d), v = rnd(b * KV * t * d), go = rnd(b * H * s * d);
    // The model's mask (b, 1, s, t): query i (position t − s + i) sees keys ≤ its position and,
    // in batch row 1, ≥ pad.
    Vf mask(b * s * t);
    for (u64 bi = 0; bi < b; ++bi)
        for (u64 i = 0; i < s; ++i)
            for (u64 j = 0; j < t; ++j) {
                const bool see = j <= t - s + i && (bi == 0 || j >= cs.pad);
                mask[(bi * s + i) * t + j] = see ? 0.0f : (cs.minus_inf ? -INFINITY : -FLT_MAX);
            }
    // Reference in double: x = q·k·scale + mask (f32::MIN kept finite), softmax, P·v; gradients.
    Vd o_ref(b * H * s * d), dq_ref(q.size()), dk_ref(k.size()), dv_ref(v.size());
    for (u64 bi = 0; bi < b; ++bi)
        for (u64 h = 0; h < H; ++h)
            for (u64 i = 0; i < s; ++i) {
                const u64 kh = bi * KV + h / rep, row = (bi * H + h) * s + i;
                Vd x(t), p(t);
                for (u64 j = 0; j < t; ++j) {
                    double dot = 0;
                    for (u64 e = 0; e < d; ++e) dot += (double)q[row * d + e] * k[(kh * t + j) * d + e];
                    double m = cs.masked ? mask[(bi * s + i) * t + j] : 0.0;
                    x[j] = (m < -1e38) ? -1e300 : dot * scale + m; // every masked score equal
                }
                const double mx = *std::max_element(x.begin(), x.end());
                double sum = 0;
                for (u64 j = 0; j < t; ++j) sum += p[j] = std::exp(x[j] - mx);
                for (auto &pj : p) pj /= sum;
                Vd dp(t);
                double dd = 0;
                for (u64 e = 0; e < d; ++e) {
                    double acc = 0;
                    for (u64 j = 0; j < t; ++j) acc += p[j] * v[(kh * t + j) * d + e];
                    o_ref[row * d + e] = acc;
                }
                for (u64 j = 0; j < t; ++j) {
                    double acc = 0;
                    for (u64 e = 0; e < d; ++e) acc += (double)go[row * d + e] * v[(kh * t + j) * d + e];
                    dp[j] = acc;
                    dd += p[j] * acc;
                }
                for (u64 j = 0; j < t; ++j) {
                    const double ds = p[j] * (dp[j] - dd) * scale;
                    for (u64 e = 0; e < d; ++e) {
                        dq_ref[row * d + e] += ds * k[(kh * t + j) * d + e];
                        dk_ref[(kh * t + j) * d + e] += ds * q[row * d + e];
                        dv_ref[(kh * t + j) * d + e] += p[j] * go[row * d + e];
                    }
                }
            }
    // The kernels, launched as flash_cuda.rs launches them.
    const u64 has = cs.masked ? 1 : 0, ms_b = s * t, ms_h = 0, ms_s = t;
    const std::vector<T> qt = as_t(q), kt = as_t(k), vt = as_t(v), got = as_t(go);
    Vf work(b * H * s * (d + 2));
    emu_launch(Dim3{(unsigned)((s + FL_BR - 1) / FL_BR), (unsigned)(b * H), 1}, FL_WARPS * 32, [&] {
        if constexpr (std::is_same_v<T, float>)
            flash_fwd_f32(qt.data(), kt.data(), vt.data(), mask.data(), work.data(), H, KV, s, t, d, has,
                          ms_b, ms_h, ms_s, scale);
        else
            flash_fwd<T>(qt.data(), kt.data(), vt.data(), mask.data(), work.data(), H, KV, s, t, d, has, ms_b,
                         ms_h, ms_s, scale);
    });
    const u64 rows = b * H * s;
    Vf o(rows * d), ms(rows), ls(rows);
    std::vector<T> ot(rows * d); // the op's output, stored as T
    for (u64 r = 0; r < rows; ++r) {
        for (u64 e = 0; e < d; ++e) {
            ot[r * d + e] = store<T>(work[r * (d + 2) + e]);
            o[r * d + e] = load(ot[r * d + e]);
        }
        ms[r] = work[r * (d + 2) + d];
        ls[r] = work[r * (d + 2) + d + 1];
    }
    Vf dd(rows), dqf(q.size(), 0.0f);
    const u64 nq = q.size(), nk = k.size();
    std::vector<T> out(nq + 2 * nk, store<T>(NAN));
    emu_launch(Dim3{(unsigned)((rows + FL_WARPS - 1) / FL_WARPS), 1, 1}, FL_WARPS * 32, [&] {
        if constexpr (std::is_same_v<T, float>)
            flash_bwd_dot_f32(got.data(), ot.data(), dd.data(), rows, d);
        else
            flash_bwd_dot<T>(got.data(), ot.data(), dd.data(), rows, d);
    });
    emu_launch(Dim3{(unsigned)((t + FB_BC - 1) / FB_BC), (unsigned)(b * KV), 1}, FL_WARPS * 32, [&] {
        if constexpr (std::is_same_v<T, float>)
            flash_bwd_f32(qt.data(), kt.data(), vt.data(), got.data(), ms.data(), ls.data(), dd.data(),
                          mask.data(), dqf.data(), out.data(), nq, nq + nk, H, KV, s, t, d, has, ms_b, ms_h,
                          ms_s, scale);
        else
            flash_bwd<T>(qt.data(), kt.data(), vt.data(), got.data(), ms.data(), ls.data(), dd.data(),
                         mask.data(), dqf.data(), out.data(), nq, nq + nk, H, KV, s, t, d, has, ms_b, ms_h,
                         ms_s, scale);
    });
    emu_launch(Dim3{(unsigned)((nq + 255) / 256), 1, 1}, 256, [&] {
        if constexpr (std::is_same_v<T, float>)
            flash_cast_f32(dqf.data(), out.data(), nq);
        else
            flash_cast<T>(dqf.data(), out.data(), nq);
    });
    Vf all(out.size());
    for (size_t i = 0; i < out.size(); ++i) all[i] = load(out[i]);
    const Vf dq(all.begin(), all.begin() + nq), dk(all.begin() + nq, all.begin() + nq + nk),
        dv(all.begin() + nq + nk, all.end());
    return report(cs.name, dt, tol, "forward", o, o_ref) + report(cs.name, dt, tol, "dq", dq, dq_ref) +
           report(cs.name, dt, tol, "dk", dk, dk_ref) + report(cs.name, dt, tol, "dv", dv, dv_ref);
}

int main() {
    const Case cases[] = {
        {"gqa causal+pad", 2, 4, 2, 37, 37, 64, 5, true, false},
        {"-inf mask", 2, 4, 2, 37, 37, 64, 5, true, true},
        {"pad past a tile", 2, 2, 1, 50, 50, 16, 40, true, false},
        {"mha", 1, 3, 3, 70, 70, 32, 0, true, false},
        {"kv-cache d80", 2, 4, 1, 5, 45, 80, 3, true, false},
        {"one query", 2, 2, 2, 1, 19, 16, 4, true, false},
        {"no mask d128", 1, 2, 2, 20, 33, 128, 0, false, false},
    };
    int fails = 0;
    for (const Case &c : cases) fails += run<float>(c, "f32", 1e-4);
    for (const Case &c : cases) fails += run<__nv_bfloat16>(c, "bf16", 3e-2);
    std::printf("\n%d failed: %s\n", fails, fails ? "FAIL" : "PASS");
    return fails ? 1 : 0;
}
