// Op-by-op test of the CUDA backend: every kernel runs on fresh random inputs
// (never zeros) and is compared with a straightforward CPU reference computed
// here; the output buffers are poisoned (0xFF bytes: NaN in fp32 and bf16)
// before each run so that an element a kernel fails to write is caught. Last,
// a tiny random model runs through the whole backend (chunked prefill, decode
// through CUDA graphs and eagerly) against a CPU forward pass.
//
// bf16 paths pass at a relative error <= 1e-2 (norm-wise, and element-wise
// against the largest reference value); sampling must pick the same token.
// Exits 77 when there is no GPU; prints one line per check and a summary.
#include "../../engine/cuda/backend_cuda.h"
#include "../../engine/cuda/ops.cuh"
#include "spool/sample.h"

#include <algorithm>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <string>
#include <vector>

static int n_fail, n_pass;
static struct se_cuda_err err;
static cudaStream_t st;
static cublasHandle_t cub;

#define CK(x)                                                                                      \
    do {                                                                                           \
        int rc_ = (x);                                                                             \
        if (rc_ != 0) {                                                                            \
            fprintf(stderr, "FATAL %s:%d: %s -> %d: %s\n", __FILE__, __LINE__, #x, rc_, err.msg);  \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)
#define CU(x) CK(se__cuda_check(&err, (x), #x, __FILE__, __LINE__))

// ---- random numbers and bf16 on the host ----

static uint64_t rng_state = 0x1234567;
static uint64_t rnd_u64(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
// Uniform in +-[lo, hi): never zero.
static float rnd_nz(float lo, float hi)
{
    float m = lo + (hi - lo) * (float)(rnd_u64() >> 40) / (float)(1 << 24);
    return (rnd_u64() & 1) ? m : -m;
}
static int rnd_int(int n)
{
    return (int)(rnd_u64() % (uint64_t)n);
}
static float bf_round(float f)
{
    return __bfloat162float(__float2bfloat16_rn(f));
}
static std::vector<float> rnd_vec(size_t n, float lo = 0.05f, float hi = 1.0f, bool bf = false)
{
    std::vector<float> v(n);
    for (auto &x : v)
        x = bf ? bf_round(rnd_nz(lo, hi)) : rnd_nz(lo, hi);
    return v;
}
static std::vector<se_bf16> to_bf(const std::vector<float> &v)
{
    std::vector<se_bf16> o(v.size());
    for (size_t i = 0; i < v.size(); i++)
        o[i] = __float2bfloat16_rn(v[i]);
    return o;
}

// ---- device buffers ----

template <typename T> static T *up(const std::vector<T> &v)
{
    T *d = nullptr;
    CU(cudaMalloc((void **)&d, std::max<size_t>(v.size(), 1) * sizeof(T)));
    CU(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
template <typename T> static T *poisoned(size_t n)
{
    T *d = nullptr;
    CU(cudaMalloc((void **)&d, std::max<size_t>(n, 1) * sizeof(T)));
    CU(cudaMemset(d, 0xFF, n * sizeof(T)));
    return d;
}
static std::vector<float> down_f(const float *d, size_t n)
{
    std::vector<float> v(n);
    CU(cudaStreamSynchronize(st));
    CU(cudaMemcpy(v.data(), d, n * 4, cudaMemcpyDeviceToHost));
    return v;
}
static std::vector<float> down_bf(const se_bf16 *d, size_t n)
{
    std::vector<se_bf16> b(n);
    CU(cudaStreamSynchronize(st));
    CU(cudaMemcpy(b.data(), d, n * 2, cudaMemcpyDeviceToHost));
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++)
        v[i] = __bfloat162float(b[i]);
    return v;
}

// Compares got with ref: no NaN/inf, norm-wise relative error <= tol and
// every element within 2 * tol of the largest reference magnitude.
static void check(const char *name, const std::vector<float> &got, const std::vector<float> &ref,
                  double tol)
{
    double num = 0, den = 0, amax = 0, emax = 0;
    size_t bad = 0, first_bad = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        if (!isfinite(got[i])) {
            if (!bad++)
                first_bad = i;
            continue;
        }
        const double d = (double)got[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
        amax = std::max(amax, fabs((double)ref[i]));
        emax = std::max(emax, fabs(d));
    }
    const double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    const bool ok = !bad && rel <= tol && emax <= 2 * tol * std::max(amax, 1e-6);
    printf("%s %-44s n=%-8zu rel=%.2e maxerr=%.2e%s\n", ok ? "ok  " : "FAIL", name, ref.size(), rel,
           emax, bad ? " (non-finite or unwritten elements)" : "");
    if (bad)
        printf("     first non-finite at %zu\n", first_bad);
    ok ? n_pass++ : n_fail++;
}
static void check_true(const char *name, bool ok, const char *detail)
{
    printf("%s %-44s %s\n", ok ? "ok  " : "FAIL", name, detail);
    ok ? n_pass++ : n_fail++;
}

// ---- ops ----

static void test_get_rows(void)
{
    const int V = 1000, D = 300, N = 37;
    auto tab = rnd_vec((size_t)V * D, 0.05f, 1.0f, true);
    std::vector<int32_t> ids(N);
    for (auto &i : ids)
        i = rnd_int(V);
    se_bf16 *dt = up(to_bf(tab));
    int32_t *di = up(ids);
    float *of = poisoned<float>((size_t)N * D);
    se_bf16 *ob = poisoned<se_bf16>((size_t)N * D);
    CK(se__cu_get_rows_bf16_f32(&err, st, dt, V, D, di, N, of));
    CK(se__cu_get_rows_bf16_bf16(&err, st, dt, V, D, di, N, ob));
    std::vector<float> ref((size_t)N * D);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < D; j++)
            ref[(size_t)i * D + j] = tab[(size_t)ids[i] * D + j];
    check("get_rows bf16->f32", down_f(of, ref.size()), ref, 1e-6);
    check("get_rows bf16->bf16", down_bf(ob, ref.size()), ref, 1e-6);
    float *tf = up(tab);
    float *of2 = poisoned<float>((size_t)N * D);
    CK(se__cu_get_rows_f32(&err, st, tf, V, D, di, N, of2));
    check("get_rows f32", down_f(of2, ref.size()), ref, 1e-7);
    cudaFree(dt), cudaFree(di), cudaFree(of), cudaFree(ob), cudaFree(tf), cudaFree(of2);
}

static void test_rms_norm(void)
{
    const int N = 19, D = 4096;
    const float eps = 1e-5f;
    for (int with_add = 0; with_add < 2; with_add++) {
        auto x = rnd_vec((size_t)N * D, 0.05f, 2.0f);
        auto a = rnd_vec((size_t)N * D, 0.05f, 2.0f);
        auto w = rnd_vec(D, 0.5f, 1.5f, true);
        float *dx = up(x), *da = up(a);
        se_bf16 *dw = up(to_bf(w));
        se_bf16 *o = poisoned<se_bf16>((size_t)N * D);
        CK(se__cu_add_rms_norm(&err, st, dx, with_add ? da : nullptr, dw, N, D, eps, o));
        std::vector<float> rx(x), ro((size_t)N * D);
        for (int i = 0; i < N; i++) {
            double ss = 0;
            for (int j = 0; j < D; j++) {
                if (with_add)
                    rx[(size_t)i * D + j] += a[(size_t)i * D + j];
                ss += (double)rx[(size_t)i * D + j] * rx[(size_t)i * D + j];
            }
            const double r = 1.0 / sqrt(ss / D + eps);
            for (int j = 0; j < D; j++)
                ro[(size_t)i * D + j] = (float)(rx[(size_t)i * D + j] * r * w[j]);
        }
        check(with_add ? "add_rms_norm: residual" : "rms_norm: residual untouched",
              down_f(dx, rx.size()), rx, 1e-6);
        check(with_add ? "add_rms_norm: output" : "rms_norm: output", down_bf(o, ro.size()), ro,
              1e-2);
        cudaFree(dx), cudaFree(da), cudaFree(dw), cudaFree(o);
    }
}

static void test_rope(void)
{
    const int N = 23, NH = 8, NKV = 2, HD = 128, W = (NH + 2 * NKV) * HD;
    auto qkv = rnd_vec((size_t)N * W);
    auto bias = rnd_vec(W, 0.01f, 0.5f);
    std::vector<int32_t> pos(N);
    for (auto &p : pos)
        p = rnd_int(8192);
    std::vector<float> inv(HD / 2);
    for (int i = 0; i < HD / 2; i++) // llama3-like: some frequencies scaled down
        inv[i] = (float)(1.0 / pow(500000.0, 2.0 * i / HD)) / (i > HD / 4 ? 8.0f : 1.0f);
    for (int with_bias = 0; with_bias < 2; with_bias++) {
        float *d = up(qkv), *db = up(bias), *di = up(inv);
        int32_t *dp = up(pos);
        CK(se__cu_rope(&err, st, d, N, W, NH, NKV, HD, with_bias ? db : nullptr, dp, di));
        std::vector<float> ref(qkv);
        for (int t = 0; t < N; t++) {
            float *r = &ref[(size_t)t * W];
            if (with_bias)
                for (int j = 0; j < W; j++)
                    r[j] += bias[j];
            for (int h = 0; h < NH + NKV; h++)
                for (int i = 0; i < HD / 2; i++) {
                    const double ang = (double)(float)((float)pos[t] * inv[i]);
                    const float x1 = r[h * HD + i], x2 = r[h * HD + i + HD / 2];
                    r[h * HD + i] = (float)(x1 * cos(ang) - x2 * sin(ang));
                    r[h * HD + i + HD / 2] = (float)(x2 * cos(ang) + x1 * sin(ang));
                }
        }
        check(with_bias ? "rope + qkv bias" : "rope", down_f(d, ref.size()), ref, 1e-4);
        cudaFree(d), cudaFree(db), cudaFree(di), cudaFree(dp);
    }
}

// The llama3 inverse frequencies (Llama 3.1 8B's rope_scaling) against the
// formula of transformers' _compute_llama3_parameters, in float like torch.
static void test_rope_llama3(void)
{
    se_model_config c;
    memset(&c, 0, sizeof c);
    c.head_dim = 128;
    c.rope_theta = 500000.0f;
    c.rope_llama3 = true;
    c.rope_factor = 8.0f;
    c.rope_low_freq_factor = 1.0f;
    c.rope_high_freq_factor = 4.0f;
    c.rope_original_max_position = 8192;
    std::vector<float> got(64), ref(64);
    se__cu_rope_inv_freq(&c, got.data());
    int n_low = 0, n_mid = 0, n_high = 0;
    for (int i = 0; i < 64; i++) {
        const float f = 1.0f / powf(500000.0f, (float)(2 * i) / 128.0f);
        const float wl = 2.0f * 3.14159265358979f / f;
        if (wl < 8192.0f / 4.0f) {
            ref[i] = f, n_high++;
        } else if (wl > 8192.0f / 1.0f) {
            ref[i] = f / 8.0f, n_low++;
        } else {
            const float sm = (8192.0f / wl - 1.0f) / (4.0f - 1.0f);
            ref[i] = (1 - sm) * f / 8.0f + sm * f, n_mid++;
        }
    }
    check("rope llama3 inverse frequencies", got, ref, 1e-5);
    char d[96];
    snprintf(d, sizeof d, "%d high, %d blended, %d low frequencies", n_high, n_mid, n_low);
    check_true("rope llama3 covers all three bands", n_high && n_mid && n_low, d);
}

static void test_swiglu(void)
{
    const int N = 13, IM = 1000;
    auto gu = rnd_vec((size_t)N * 2 * IM, 0.05f, 4.0f);
    float *d = up(gu);
    se_bf16 *o = poisoned<se_bf16>((size_t)N * IM);
    CK(se__cu_swiglu(&err, st, d, N, IM, o));
    std::vector<float> ref((size_t)N * IM);
    for (int r = 0; r < N; r++)
        for (int c = 0; c < IM; c++) {
            const double g = gu[(size_t)r * 2 * IM + c], u = gu[(size_t)r * 2 * IM + IM + c];
            ref[(size_t)r * IM + c] = (float)(g / (1 + exp(-g)) * u);
        }
    check("swiglu", down_bf(o, ref.size()), ref, 1e-2);
    cudaFree(d), cudaFree(o);
}

static void test_gemm(void)
{
    const int N = 33, K = 520, M = 300;
    auto x = rnd_vec((size_t)N * K, 0.05f, 1.0f, true);
    auto w = rnd_vec((size_t)M * K, 0.05f, 1.0f, true);
    auto y0 = rnd_vec((size_t)N * M);
    se_bf16 *dx = up(to_bf(x)), *dw = up(to_bf(w));
    std::vector<float> ref((size_t)N * M);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < M; j++) {
            double s = 0;
            for (int k = 0; k < K; k++)
                s += (double)x[(size_t)i * K + k] * w[(size_t)j * K + k];
            ref[(size_t)i * M + j] = (float)s;
        }
    float *yf = poisoned<float>(ref.size());
    CK(se__cu_gemm(&err, cub, dx, N, K, dw, M, yf, 0, 0.0f));
    check("gemm bf16 -> f32", down_f(yf, ref.size()), ref, 1e-3);
    se_bf16 *yb = poisoned<se_bf16>(ref.size());
    CK(se__cu_gemm(&err, cub, dx, N, K, dw, M, yb, 1, 0.0f));
    check("gemm bf16 -> bf16", down_bf(yb, ref.size()), ref, 1e-2);
    float *ya = up(y0);
    CK(se__cu_gemm(&err, cub, dx, N, K, dw, M, ya, 0, 1.0f));
    std::vector<float> ref2(ref);
    for (size_t i = 0; i < ref2.size(); i++)
        ref2[i] += y0[i];
    check("gemm accumulate (beta = 1)", down_f(ya, ref2.size()), ref2, 1e-3);
    cudaFree(dx), cudaFree(dw), cudaFree(yf), cudaFree(yb), cudaFree(ya);
}

// A paged-attention problem: n_seq sequences with contexts of random length,
// blocks handed out in shuffled order, the last seq_new[s] tokens of each new
// in this pass (the rest already cached).
struct attn_case {
    int nh, nkv, hd, bs, n_blocks;
    std::vector<int> ctx, nnew;
};

static void run_attn_case(const char *name, const attn_case &c, bool decode_kernel, int splits)
{
    const int n_seq = (int)c.ctx.size(), W = (c.nh + 2 * c.nkv) * c.hd;
    const size_t blk_elems = (size_t)c.nkv * c.bs * c.hd;
    // Block tables from a shuffled pool.
    std::vector<int> pool(c.n_blocks);
    for (int i = 0; i < c.n_blocks; i++)
        pool[i] = i;
    for (int i = c.n_blocks - 1; i > 0; i--)
        std::swap(pool[i], pool[rnd_int(i + 1)]);
    std::vector<int32_t> bt_flat, bt_off(n_seq), seq_ntok(n_seq);
    int used = 0;
    for (int s = 0; s < n_seq; s++) {
        bt_off[s] = (int32_t)bt_flat.size();
        for (int k = 0; k < (c.ctx[s] + c.bs - 1) / c.bs; k++)
            bt_flat.push_back(pool[used++]);
        seq_ntok[s] = c.nnew[s];
    }
    // Cache contents: random bf16 everywhere (old tokens), then the new tokens via kv_write.
    auto kc = rnd_vec(blk_elems * c.n_blocks, 0.05f, 1.0f, true);
    auto vc = rnd_vec(blk_elems * c.n_blocks, 0.05f, 1.0f, true);
    std::vector<int32_t> tok_seq, tok_pos, slots, tiles;
    for (int s = 0; s < n_seq; s++) {
        const int t0 = (int)tok_seq.size();
        for (int p = c.ctx[s] - c.nnew[s]; p < c.ctx[s]; p++) {
            tok_seq.push_back(s);
            tok_pos.push_back(p);
            slots.push_back(bt_flat[bt_off[s] + p / c.bs] * c.bs + p % c.bs);
        }
        if (!decode_kernel && c.nnew[s] > 1)
            for (int k = 0; k < c.nnew[s]; k += SE_CU_PREFILL_TILE) {
                tiles.push_back(t0 + k);
                tiles.push_back(std::min(SE_CU_PREFILL_TILE, c.nnew[s] - k));
            }
    }
    const int n = (int)tok_seq.size();
    auto qkv = rnd_vec((size_t)n * W, 0.05f, 1.0f);
    se_bf16 *dk = up(to_bf(kc)), *dv = up(to_bf(vc));
    float *dq = up(qkv);
    int32_t *d_seq = up(tok_seq), *d_pos = up(tok_pos), *d_off = up(bt_off), *d_bt = up(bt_flat),
            *d_nt = up(seq_ntok), *d_slots = up(slots), *d_tiles = up(tiles);
    CK(se__cu_kv_write(&err, st, dq, n, W, c.nh * c.hd, (c.nh + c.nkv) * c.hd, c.nkv, c.hd, d_slots,
                       dk, dv, c.bs));
    // Reference cache: the new tokens' K/V rounded to bf16 into their slots.
    for (int t = 0; t < n; t++) {
        const size_t blk = slots[t] / c.bs, off = slots[t] % c.bs;
        for (int h = 0; h < c.nkv; h++)
            for (int d = 0; d < c.hd; d++) {
                const size_t at = ((blk * c.nkv + h) * c.bs + off) * c.hd + d;
                kc[at] = bf_round(qkv[(size_t)t * W + c.nh * c.hd + h * c.hd + d]);
                vc[at] = bf_round(qkv[(size_t)t * W + (c.nh + c.nkv) * c.hd + h * c.hd + d]);
            }
    }
    if (decode_kernel) {
        std::string nm = std::string(name) + ": kv_write";
        check(nm.c_str(), down_bf(dk, kc.size()), kc, 1e-7);
    }
    se_bf16 *out = poisoned<se_bf16>((size_t)n * c.nh * c.hd);
    se_cu_attn_meta m;
    m.tok_seq = d_seq;
    m.tok_pos = d_pos;
    m.seq_bt_off = d_off;
    m.bt_flat = d_bt;
    m.seq_n_tokens = d_nt;
    m.skip_multi = 0;
    const float scale = 1.0f / sqrtf((float)c.hd);
    float *partial = poisoned<float>((size_t)n * c.nh * std::max(splits, 1) * (c.hd + 2));
    if (decode_kernel) {
        CK(se__cu_attn_decode(&err, st, dq, W, dk, dv, &m, n, c.nh, c.nkv, c.hd, c.bs, scale,
                              splits, partial, out));
    } else {
        // As the backend does for a mixed batch: single tokens through attn_decode.
        m.skip_multi = 1;
        CK(se__cu_attn_decode(&err, st, dq, W, dk, dv, &m, n, c.nh, c.nkv, c.hd, c.bs, scale,
                              splits, partial, out));
        CK(se__cu_attn_prefill(&err, st, dq, W, dk, dv, &m, d_tiles, (int)tiles.size() / 2, c.nh,
                               c.nkv, c.hd, c.bs, scale, out));
    }
    std::vector<float> ref((size_t)n * c.nh * c.hd);
    std::vector<double> sc;
    for (int t = 0; t < n; t++) {
        const int s = tok_seq[t], L = tok_pos[t] + 1;
        for (int h = 0; h < c.nh; h++) {
            const int kvh = h / (c.nh / c.nkv);
            sc.assign(L, 0);
            double mx = -1e300;
            for (int j = 0; j < L; j++) {
                const size_t base =
                    (((size_t)bt_flat[bt_off[s] + j / c.bs] * c.nkv + kvh) * c.bs + j % c.bs) *
                    c.hd;
                double d = 0;
                for (int i = 0; i < c.hd; i++)
                    d += (double)qkv[(size_t)t * W + h * c.hd + i] * kc[base + i];
                sc[j] = d * scale;
                mx = std::max(mx, sc[j]);
            }
            double z = 0;
            for (int j = 0; j < L; j++)
                z += (sc[j] = exp(sc[j] - mx));
            for (int i = 0; i < c.hd; i++) {
                double a = 0;
                for (int j = 0; j < L; j++) {
                    const size_t base =
                        (((size_t)bt_flat[bt_off[s] + j / c.bs] * c.nkv + kvh) * c.bs + j % c.bs) *
                        c.hd;
                    a += sc[j] * vc[base + i];
                }
                ref[((size_t)t * c.nh + h) * c.hd + i] = (float)(a / z);
            }
        }
    }
    check(name, down_bf(out, ref.size()), ref, 1e-2);
    cudaFree(dk), cudaFree(dv), cudaFree(dq), cudaFree(d_seq), cudaFree(d_pos), cudaFree(d_off);
    cudaFree(d_bt), cudaFree(d_nt), cudaFree(d_slots), cudaFree(d_tiles), cudaFree(out);
    cudaFree(partial);
}

static void test_attention(bool quick)
{
    // Decode: one new token per sequence; GQA groups of 4, block sizes 16 and 7.
    attn_case a = {32, 8, 128, 16, 200, {1, 17, 300, 64, 1000}, {1, 1, 1, 1, 1}};
    run_attn_case("attn_decode hd128 gqa4 bs16", a, true, 1);
    run_attn_case("attn_decode hd128 gqa4 bs16 split 7", a, true, 7);
    attn_case b = {12, 2, 64, 7, 400, {5, 77, 333, 700}, {1, 1, 1, 1}};
    run_attn_case("attn_decode hd64 gqa6 bs7 split 3", b, true, 3);
    attn_case g = {40, 2, 96, 16, 64, {33, 400}, {1, 1}}; // 20 heads per kv head: two groups
    run_attn_case("attn_decode hd96 gqa20 split 2", g, true, 2);
    attn_case h = {4, 4, 32, 8, 64, {9, 100}, {1, 1}}; // no GQA
    run_attn_case("attn_decode hd32 mha split 1", h, true, 1);
    // Prefill: chunks at the end of a cached prefix, mixed with decode tokens.
    attn_case p = {32, 8, 128, 16, 200, {40, 1, 300, 23}, {40, 1, 37, 5}};
    run_attn_case("attn_prefill hd128 gqa4 bs16 (+decode)", p, false, 2);
    if (!quick) {
        attn_case q = {14, 2, 64, 5, 300, {129, 700, 2}, {129, 3, 2}};
        run_attn_case("attn_prefill hd64 gqa7 bs5", q, false, 1);
        attn_case r = {8, 8, 256, 16, 64, {50, 17}, {50, 17}};
        run_attn_case("attn_prefill hd256 mha (large smem)", r, false, 1);
    }
}

// ---- sampling ----

static uint64_t splitmix64(uint64_t x)
{
    uint64_t z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The sampling contract, written plainly on the CPU.
static se_cu_sample_out ref_sample(const float *logits, int V, const se_cu_sample_row &r,
                                   const int32_t *hist)
{
    std::vector<float> w(logits, logits + V);
    const int32_t *gen = hist + r.n_prompt;
    if (r.repetition_penalty != 1.0f)
        for (int j = 0; j < r.n_prompt + r.n_gen; j++) {
            const float v = logits[hist[j]];
            w[hist[j]] = v < 0 ? v * r.repetition_penalty : v / r.repetition_penalty;
        }
    if (r.presence_penalty != 0 || r.frequency_penalty != 0) {
        std::vector<int> cnt(V, 0);
        for (int j = 0; j < r.n_gen; j++)
            cnt[gen[j]]++;
        for (int i = 0; i < V; i++)
            if (cnt[i])
                w[i] -= r.frequency_penalty * (float)cnt[i] + r.presence_penalty;
    }
    se_cu_sample_out o = {};
    float mx = -INFINITY;
    for (int i = 0; i < V; i++)
        mx = std::max(mx, w[i]);
    if (r.temperature <= 0) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (w[i] > w[best])
                best = i;
        double z = 0;
        for (int i = 0; i < V; i++)
            z += exp((double)w[i] - mx);
        o.token = best;
        o.logit = w[best];
        o.logprob = (float)(w[best] - mx - log(z));
        return o;
    }
    std::vector<float> p(V);
    std::vector<int> ord(V);
    for (int i = 0; i < V; i++) {
        p[i] = expf((w[i] - mx) / r.temperature);
        ord[i] = i;
    }
    std::sort(ord.begin(), ord.end(),
              [&](int a, int b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    int n = 0;
    while (n < V && p[ord[n]] > 0)
        n++;
    if (r.top_k > 0 && r.top_k < n)
        n = r.top_k;
    if (r.top_p < 1) {
        double tot = 0, cum = 0;
        for (int i = 0; i < n; i++)
            tot += p[ord[i]];
        int k = 0;
        while (k < n && cum < r.top_p * tot)
            cum += p[ord[k++]];
        n = std::max(k, 1);
    }
    if (r.min_p > 0) {
        int k = 0;
        while (k < n && p[ord[k]] >= r.min_p * p[ord[0]])
            k++;
        n = std::max(k, 1);
    }
    double tot = 0;
    for (int i = 0; i < n; i++)
        tot += p[ord[i]];
    const double u = (double)(splitmix64(r.seed ^ splitmix64(r.position)) >> 11) * 0x1.0p-53;
    double cum = 0;
    int pick = ord[n - 1];
    for (int i = 0; i < n; i++) {
        cum += p[ord[i]];
        if (cum > u * tot) {
            pick = ord[i];
            break;
        }
    }
    o.token = pick;
    o.logit = w[pick];
    o.logprob = (float)log(p[pick] / tot);
    return o;
}

static void test_sample(bool quick)
{
    const int V = 5000, R = quick ? 12 : 48;
    std::vector<float> logits((size_t)R * V);
    std::vector<se_cu_sample_row> rows(R);
    std::vector<int32_t> hist;
    for (int r = 0; r < R; r++) {
        for (int i = 0; i < V; i++)
            logits[(size_t)r * V + i] = rnd_nz(0.001f, 6.0f);
        se_cu_sample_row &x = rows[r];
        memset(&x, 0, sizeof x);
        const int kind = r % 6;
        x.temperature = kind == 0 ? 0.0f : 0.3f + (float)rnd_int(150) / 100.0f;
        x.top_k = kind == 2 || kind == 5 ? 1 + rnd_int(200) : 0;
        x.top_p = kind == 3 || kind == 5 ? 0.5f + (float)rnd_int(50) / 100.0f : 1.0f;
        x.min_p = kind == 4 || kind == 5 ? (float)rnd_int(30) / 100.0f : 0.0f;
        x.repetition_penalty = r % 2 ? 1.3f : 1.0f;
        x.presence_penalty = r % 3 == 1 ? 0.7f : 0.0f;
        x.frequency_penalty = r % 3 == 2 ? 0.4f : 0.0f;
        x.seed = rnd_u64();
        x.position = (uint64_t)rnd_int(4000);
        x.hist_off = (int)hist.size();
        x.n_prompt = rnd_int(60);
        x.n_gen = rnd_int(60);
        for (int j = 0; j < x.n_prompt + x.n_gen; j++)
            hist.push_back(rnd_int(V / 4)); // with repeats
        if (kind == 0 && r % 12 == 0) {
            // A tie for the maximum: the lower id must win.
            logits[(size_t)r * V + 10] = 50.0f;
            logits[(size_t)r * V + 3000] = 50.0f;
        }
    }
    float *dl = up(logits);
    int32_t *dh = up(hist);
    se_cu_sample_row *dr = nullptr;
    CU(cudaMalloc((void **)&dr, R * sizeof *dr));
    CU(cudaMemcpy(dr, rows.data(), R * sizeof *dr, cudaMemcpyHostToDevice));
    float *work = poisoned<float>((size_t)2 * R * V);
    int32_t *counts = nullptr;
    CU(cudaMalloc((void **)&counts, (size_t)R * V * 4));
    CU(cudaMemset(counts, 0, (size_t)R * V * 4));
    se_cu_sample_out *dout = poisoned<se_cu_sample_out>(R);
    CK(se__cu_sample(&err, st, dl, R, V, dr, dh, work, counts, dout));
    std::vector<se_cu_sample_out> got(R);
    CU(cudaStreamSynchronize(st));
    CU(cudaMemcpy(got.data(), dout, R * sizeof *dout, cudaMemcpyDeviceToHost));
    int same = 0, lp_ok = 0;
    char first[256] = "";
    for (int r = 0; r < R; r++) {
        const se_cu_sample_out ref =
            ref_sample(&logits[(size_t)r * V], V, rows[r], &hist[rows[r].hist_off]);
        const bool tok = ref.token == got[r].token;
        const bool lp =
            fabsf(ref.logprob - got[r].logprob) <= 1e-3f * std::max(1.0f, fabsf(ref.logprob)) &&
            fabsf(ref.logit - got[r].logit) <= 1e-5f * std::max(1.0f, fabsf(ref.logit));
        same += tok;
        lp_ok += tok && lp;
        if ((!tok || !lp) && !first[0])
            snprintf(first, sizeof first, "; row %d: ref token %d (logprob %g) got %d (%g)", r,
                     ref.token, (double)ref.logprob, got[r].token, (double)got[r].logprob);
    }
    char detail[512];
    snprintf(detail, sizeof detail, "%d/%d tokens equal, %d/%d logprob+logit equal%s", same, R,
             lp_ok, R, first);
    check_true("sample (penalties, greedy, top-k/p, min-p)", same == R && lp_ok == R, detail);
    // The penalty counts must be zero again for the next call.
    std::vector<int32_t> cz((size_t)R * V);
    CU(cudaMemcpy(cz.data(), counts, cz.size() * 4, cudaMemcpyDeviceToHost));
    check_true("sample leaves its counts at zero",
               std::all_of(cz.begin(), cz.end(), [](int32_t v) { return v == 0; }), "");
    cudaFree(dl), cudaFree(dh), cudaFree(dr), cudaFree(work), cudaFree(counts), cudaFree(dout);
}

// ---- the whole backend on a tiny random model ----

struct tiny_model {
    se_model_config cfg;
    std::vector<std::vector<float>> data;    // bf16-exact values (the reference reads these)
    std::vector<std::vector<__half>> data16; // the same values as f16 tensors (exact)
    std::vector<se_tensor> tensors;
    std::vector<se_layer_weights> layers;
    se_weights w;
};

static const se_tensor *tensor_of(tiny_model &m, size_t i)
{
    return &m.tensors[i];
}

static void make_tiny(tiny_model &m, se_dtype dtype)
{
    se_model_config &c = m.cfg;
    memset(&c, 0, sizeof c);
    c.arch = SE_ARCH_QWEN2;
    c.dtype = dtype;
    c.vocab_size = 512;
    c.hidden_size = 256;
    c.intermediate_size = 512;
    c.n_layers = 2;
    c.n_heads = 8;
    c.n_kv_heads = 2;
    c.head_dim = 32;
    c.max_position = 512;
    c.rms_eps = 1e-6f;
    c.rope_theta = 10000.0f;
    c.qkv_bias = true;
    c.tie_embeddings = false;
    const int H = c.hidden_size, Q = c.n_heads * c.head_dim, KV = c.n_kv_heads * c.head_dim,
              IM = c.intermediate_size;
    struct spec {
        const char *name;
        int64_t r, k;
        float lo, hi;
    };
    std::vector<spec> specs = {{"embed", c.vocab_size, H, 0.1f, 1.0f},
                               {"final_norm", H, 1, 0.8f, 1.2f},
                               {"lm_head", c.vocab_size, H, 0.01f, 0.1f}};
    for (int l = 0; l < c.n_layers; l++) {
        specs.push_back({"attn_norm", H, 1, 0.8f, 1.2f});
        specs.push_back({"wq", Q, H, 0.01f, 0.12f});
        specs.push_back({"wk", KV, H, 0.01f, 0.12f});
        specs.push_back({"wv", KV, H, 0.01f, 0.12f});
        specs.push_back({"bq", Q, 1, 0.01f, 0.2f});
        specs.push_back({"bk", KV, 1, 0.01f, 0.2f});
        specs.push_back({"bv", KV, 1, 0.01f, 0.2f});
        specs.push_back({"wo", H, Q, 0.01f, 0.1f});
        specs.push_back({"ffn_norm", H, 1, 0.8f, 1.2f});
        specs.push_back({"w_gate", IM, H, 0.01f, 0.1f});
        specs.push_back({"w_up", IM, H, 0.01f, 0.1f});
        specs.push_back({"w_down", H, IM, 0.01f, 0.1f});
    }
    m.data.resize(specs.size());
    m.data16.resize(specs.size());
    m.tensors.resize(specs.size());
    for (size_t i = 0; i < specs.size(); i++) {
        m.data[i] = rnd_vec((size_t)(specs[i].r * specs[i].k), specs[i].lo, specs[i].hi, true);
        if (!strcmp(specs[i].name, "final_norm") || strstr(specs[i].name, "_norm"))
            for (auto &v : m.data[i])
                v = fabsf(v);
        se_tensor &t = m.tensors[i];
        t.name = specs[i].name;
        t.dtype = dtype;
        t.n_dims = specs[i].k == 1 ? 1 : 2;
        t.shape[0] = specs[i].r;
        t.shape[1] = specs[i].k;
        t.data = m.data[i].data();
        t.nbytes = m.data[i].size() * 4;
        if (dtype == SE_DTYPE_F16) {
            for (float v : m.data[i])
                m.data16[i].push_back(__float2half_rn(v));
            t.data = m.data16[i].data();
            t.nbytes = m.data16[i].size() * 2;
        }
    }
    m.layers.resize(c.n_layers);
    for (int l = 0; l < c.n_layers; l++) {
        const size_t b = 3 + 12 * (size_t)l;
        se_layer_weights &L = m.layers[l];
        L.attn_norm = tensor_of(m, b);
        L.wq = tensor_of(m, b + 1), L.wk = tensor_of(m, b + 2), L.wv = tensor_of(m, b + 3);
        L.bq = tensor_of(m, b + 4), L.bk = tensor_of(m, b + 5), L.bv = tensor_of(m, b + 6);
        L.wo = tensor_of(m, b + 7);
        L.ffn_norm = tensor_of(m, b + 8);
        L.w_gate = tensor_of(m, b + 9), L.w_up = tensor_of(m, b + 10),
        L.w_down = tensor_of(m, b + 11);
    }
    m.w.embed = tensor_of(m, 0);
    m.w.final_norm = tensor_of(m, 1);
    m.w.lm_head = tensor_of(m, 2);
    m.w.n_layers = c.n_layers;
    m.w.layers = m.layers.data();
}

static void rms(const float *x, const float *w, int d, float eps, float *out)
{
    double ss = 0;
    for (int i = 0; i < d; i++)
        ss += (double)x[i] * x[i];
    const double r = 1.0 / sqrt(ss / d + eps);
    for (int i = 0; i < d; i++)
        out[i] = bf_round((float)(x[i] * r * w[i]));
}
static void matvec(const float *W, const float *x, int out, int in, float *y)
{
    for (int o = 0; o < out; o++) {
        double s = 0;
        for (int i = 0; i < in; i++)
            s += (double)W[(size_t)o * in + i] * x[i];
        y[o] = (float)s;
    }
}

// Logits of every position of one sequence, computed token by token with
// the same roundings as the backend (bf16 GEMM inputs and KV cache).
static std::vector<float> ref_forward(tiny_model &m, const std::vector<int> &toks)
{
    const se_model_config &c = m.cfg;
    const int H = c.hidden_size, NH = c.n_heads, NKV = c.n_kv_heads, HD = c.head_dim, Q = NH * HD,
              KV = NKV * HD, IM = c.intermediate_size, T = (int)toks.size();
    std::vector<float> logits((size_t)T * c.vocab_size);
    std::vector<std::vector<float>> kc(c.n_layers, std::vector<float>((size_t)T * KV)),
        vc(c.n_layers, std::vector<float>((size_t)T * KV));
    std::vector<float> x(H), xn(H), qkv(Q + 2 * KV), att(Q), d(H), gu(2 * IM), act(IM);
    for (int t = 0; t < T; t++) {
        const float *e = &m.data[0][(size_t)toks[t] * H];
        std::copy(e, e + H, x.begin());
        for (int l = 0; l < c.n_layers; l++) {
            const size_t b = 3 + 12 * (size_t)l;
            rms(x.data(), m.data[b].data(), H, c.rms_eps, xn.data());
            matvec(m.data[b + 1].data(), xn.data(), Q, H, qkv.data());
            matvec(m.data[b + 2].data(), xn.data(), KV, H, qkv.data() + Q);
            matvec(m.data[b + 3].data(), xn.data(), KV, H, qkv.data() + Q + KV);
            for (int i = 0; i < Q; i++)
                qkv[i] += m.data[b + 4][i];
            for (int i = 0; i < KV; i++)
                qkv[Q + i] += m.data[b + 5][i], qkv[Q + KV + i] += m.data[b + 6][i];
            for (int h = 0; h < NH + NKV; h++)
                for (int i = 0; i < HD / 2; i++) {
                    const float inv = (float)(1.0 / pow((double)c.rope_theta, 2.0 * i / HD));
                    const double ang = (float)t * inv;
                    float &a = qkv[h * HD + i], &bb = qkv[h * HD + i + HD / 2];
                    const float x1 = a, x2 = bb;
                    a = (float)(x1 * cos(ang) - x2 * sin(ang));
                    bb = (float)(x2 * cos(ang) + x1 * sin(ang));
                }
            for (int i = 0; i < KV; i++) {
                kc[l][(size_t)t * KV + i] = bf_round(qkv[Q + i]);
                vc[l][(size_t)t * KV + i] = bf_round(qkv[Q + KV + i]);
            }
            for (int h = 0; h < NH; h++) {
                const int kh = h / (NH / NKV);
                std::vector<double> s(t + 1);
                double mx = -1e300, z = 0;
                for (int j = 0; j <= t; j++) {
                    double dd = 0;
                    for (int i = 0; i < HD; i++)
                        dd += (double)qkv[h * HD + i] * kc[l][(size_t)j * KV + kh * HD + i];
                    s[j] = dd / sqrt((double)HD);
                    mx = std::max(mx, s[j]);
                }
                for (int j = 0; j <= t; j++)
                    z += (s[j] = exp(s[j] - mx));
                for (int i = 0; i < HD; i++) {
                    double a = 0;
                    for (int j = 0; j <= t; j++)
                        a += s[j] * vc[l][(size_t)j * KV + kh * HD + i];
                    att[h * HD + i] = bf_round((float)(a / z));
                }
            }
            matvec(m.data[b + 7].data(), att.data(), H, Q, d.data());
            for (int i = 0; i < H; i++)
                x[i] += d[i];
            rms(x.data(), m.data[b + 8].data(), H, c.rms_eps, xn.data());
            matvec(m.data[b + 9].data(), xn.data(), IM, H, gu.data());
            matvec(m.data[b + 10].data(), xn.data(), IM, H, gu.data() + IM);
            for (int i = 0; i < IM; i++)
                act[i] = bf_round((float)(gu[i] / (1 + exp(-(double)gu[i])) * gu[IM + i]));
            matvec(m.data[b + 11].data(), act.data(), H, IM, d.data());
            for (int i = 0; i < H; i++)
                x[i] += d[i];
        }
        rms(x.data(), m.data[1].data(), H, c.rms_eps, xn.data());
        matvec(m.data[2].data(), xn.data(), c.vocab_size, H, &logits[(size_t)t * c.vocab_size]);
    }
    return logits;
}

// Three sequences: prompts prefilled in chunks of 5 (with a single-token
// sequence decoding alongside), then decode steps of all three together.
static void test_backend(bool graphs)
{
    setenv("SPOOL_CUDA_GRAPHS", graphs ? "1" : "0", 1);
    // f32 weights with graphs, f16 without: both are converted to bf16 at load.
    tiny_model m;
    make_tiny(m, graphs ? SE_DTYPE_F32 : SE_DTYPE_F16);
    se_backend be;
    char msg[512];
    CK(se__backend_cuda_new(0, 0.5f, &be, msg, sizeof msg));
    CK(be.i->load(be.ctx, &m.cfg, &m.w));
    const int bs = 4, n_blocks = be.i->kv_blocks_for(be.ctx, (size_t)64 << 20, bs);
    if (n_blocks < 64) {
        check_true("backend kv_blocks_for", false, be.i->last_error(be.ctx));
        return;
    }
    CK(be.i->kv_alloc(be.ctx, 64, bs));
    const int S = 3, V = m.cfg.vocab_size;
    std::vector<std::vector<int>> toks(S);
    const int plen[S] = {13, 1, 7};
    for (int s = 0; s < S; s++)
        for (int i = 0; i < plen[s] + 6; i++)
            toks[s].push_back(rnd_int(V));
    // Block tables: blocks handed out from the top down, so that no table is the identity.
    std::vector<std::vector<int32_t>> bt(S);
    int next = 63;
    for (int s = 0; s < S; s++)
        for (int k = 0; k < 8; k++)
            bt[s].push_back(next--);
    std::vector<const int32_t *> btp(S);
    for (int s = 0; s < S; s++)
        btp[s] = bt[s].data();
    std::vector<std::vector<float>> got(S);
    std::vector<int> done(S, 0), target(S);
    for (int s = 0; s < S; s++)
        target[s] = (int)toks[s].size();
    std::vector<float> logits;
    bool ok = true;
    for (int step = 0; ok; step++) {
        // Each sequence contributes up to 5 of its prompt, or 1 token when decoding.
        std::vector<int32_t> tk, pos, start(S), ntok(S), ctx(S), rows;
        for (int s = 0; s < S; s++) {
            const int take = std::min(target[s] - done[s],
                                      done[s] < plen[s] ? std::min(5, plen[s] - done[s]) : 1);
            start[s] = (int32_t)tk.size();
            ntok[s] = take;
            for (int i = 0; i < take; i++) {
                tk.push_back(toks[s][done[s] + i]);
                pos.push_back(done[s] + i);
                rows.push_back((int32_t)tk.size() - 1); // every row's logits
            }
            ctx[s] = done[s] + take;
        }
        if (tk.empty())
            break;
        // Sequences with nothing left still need one token: stop at the first finished one.
        if (std::find(ntok.begin(), ntok.end(), 0) != ntok.end())
            break;
        se_batch b;
        b.n_tokens = (int)tk.size();
        b.tokens = tk.data();
        b.positions = pos.data();
        b.n_seqs = S;
        b.seq_start = start.data();
        b.seq_n_tokens = ntok.data();
        b.seq_ctx_len = ctx.data();
        b.block_tables = btp.data();
        b.n_logits = (int)rows.size();
        b.logit_rows = rows.data();
        logits.assign((size_t)b.n_logits * V, NAN);
        int rc = be.i->forward(be.ctx, &b, logits.data());
        if (rc) {
            check_true("backend forward", false, be.i->last_error(be.ctx));
            ok = false;
            break;
        }
        for (int s = 0; s < S; s++) {
            got[s].insert(got[s].end(), logits.begin() + (size_t)start[s] * V,
                          logits.begin() + (size_t)(start[s] + ntok[s]) * V);
            done[s] += ntok[s];
        }
    }
    // Sampling on the device from the last pass's logits (still in `logits` on the host).
    if (ok) {
        se_sampling sp[S];
        memset(sp, 0, sizeof sp);
        for (int s = 0; s < S; s++) {
            sp[s].temperature = s == 0 ? 0.0f : 0.9f;
            sp[s].top_k = s == 1 ? 40 : 0;
            sp[s].top_p = s == 2 ? 0.9f : 1.0f;
            sp[s].repetition_penalty = s == 2 ? 1.2f : 1.0f;
            sp[s].frequency_penalty = s == 1 ? 0.5f : 0.0f;
            sp[s].seed = 1000 + s;
        }
        const int32_t *pr[S], *gen[S];
        size_t npr[S], ngen[S];
        std::vector<int32_t> all[S];
        for (int s = 0; s < S; s++) {
            all[s].assign(toks[s].begin(), toks[s].begin() + done[s]);
            pr[s] = all[s].data();
            npr[s] = (size_t)plen[s];
            gen[s] = all[s].data() + plen[s];
            ngen[s] = (size_t)(done[s] - plen[s]);
        }
        se_sample_result res[S];
        const int rc = be.i->sample(be.ctx, S, sp, pr, npr, gen, ngen, res);
        int same = 0;
        for (int s = 0; s < S && rc == 0; s++) {
            se_cu_sample_row r;
            memset(&r, 0, sizeof r);
            r.temperature = sp[s].temperature, r.top_k = sp[s].top_k, r.top_p = sp[s].top_p;
            r.repetition_penalty = sp[s].repetition_penalty;
            r.frequency_penalty = sp[s].frequency_penalty;
            r.seed = sp[s].seed;
            r.position = (uint64_t)done[s];
            r.n_prompt = plen[s];
            r.n_gen = done[s] - plen[s];
            const se_cu_sample_out ref = ref_sample(&logits[(size_t)s * V], V, r, all[s].data());
            same += ref.token == res[s].token;
        }
        char d[256];
        snprintf(d, sizeof d, "rc %d, %d/%d tokens as the CPU reference; %s", rc, same, S,
                 rc ? be.i->last_error(be.ctx) : "");
        check_true(graphs ? "backend sample (graphs on)" : "backend sample (graphs off)",
                   rc == 0 && same == S, d);
    }
    for (int s = 0; s < S && ok; s++) {
        std::vector<int> t(toks[s].begin(), toks[s].begin() + done[s]);
        auto ref = ref_forward(m, t);
        char name[96];
        snprintf(name, sizeof name, "backend logits seq %d (%d tokens, %s, graphs %s)", s, done[s],
                 graphs ? "f32" : "f16", graphs ? "on" : "off");
        check(name, got[s], ref, 1e-2);
    }
    // kv_copy: a sequence whose blocks are copies of sequence 0's must
    // continue exactly as sequence 0 does (copy-on-write of a shared prefix).
    if (ok) {
        const int n0 = done[0], nb = (n0 + 1 + bs - 1) / bs;
        std::vector<int32_t> bt2;
        for (int k = 0; k < nb; k++) {
            CK(be.i->kv_copy(be.ctx, 8 + k, bt[0][k]));
            bt2.push_back(8 + k);
        }
        const int32_t tk[2] = {7, 7}, pos[2] = {n0, n0}, start[2] = {0, 1}, ntok[2] = {1, 1},
                      ctx[2] = {n0 + 1, n0 + 1}, rows[2] = {0, 1};
        const int32_t *tabs[2] = {bt[0].data(), bt2.data()};
        se_batch b = {2, tk, pos, 2, start, ntok, ctx, tabs, 2, rows};
        logits.assign((size_t)2 * V, NAN);
        CK(be.i->forward(be.ctx, &b, logits.data()));
        std::vector<float> a(logits.begin(), logits.begin() + V),
            c(logits.begin() + V, logits.end());
        check(graphs ? "backend kv_copy (graphs on)" : "backend kv_copy (graphs off)", c, a, 1e-6);
    }
    be.i->free(be.ctx);
}

static void test_nodev_message(void)
{
    // Asking for a device that does not exist gives SP_ENODEV with a message.
    se_backend be;
    char msg[512] = "";
    int rc = se__backend_cuda_new(4096, 0.5f, &be, msg, sizeof msg);
    check_true("constructor: missing device -> SP_ENODEV", rc == SP_ENODEV && msg[0], msg);
}

int main(int argc, char **argv)
{
    const bool quick = argc > 1 && !strcmp(argv[1], "--quick");
    int count = 0;
    cudaError_t ce = cudaGetDeviceCount(&count);
    if (ce != cudaSuccess || count == 0) {
        printf("no GPU: skipped (%s)\n", ce == cudaSuccess ? "no device" : cudaGetErrorName(ce));
        return 77;
    }
    CU(cudaStreamCreate(&st));
    CK(se__cuda_check(&err, cublasCreate(&cub), "cublasCreate", __FILE__, __LINE__));
    CK(se__cuda_check(&err, cublasSetStream(cub, st), "cublasSetStream", __FILE__, __LINE__));
    test_get_rows();
    test_rms_norm();
    test_rope();
    test_rope_llama3();
    test_swiglu();
    test_gemm();
    test_attention(quick);
    test_sample(quick);
    test_backend(true);
    test_backend(false);
    test_nodev_message();
    CU(cudaDeviceSynchronize());
    cublasDestroy(cub);
    cudaStreamDestroy(st);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
