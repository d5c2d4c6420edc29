// Benchmark of the CUDA backend on Llama-3 shapes with random bf16 weights:
// decode tokens/s at batch 1, 32, 128 and 256 and prefill tokens/s, each next
// to a roofline measured in the same run (device-to-device copy bandwidth for
// the bytes a step must read; a cuBLAS bf16 GEMM rate for its FLOPs).
//
// Usage: engine_gpu [8b|1b] [--prompt N] [--steps N] [--batches 1,32,128,256]
// Prints figures and asserts nothing; exits 77 without a GPU.
//
// The weights are random host buffers, one per distinct shape, shared by
// every layer (the backend uploads each layer separately, so the device holds
// the full model); their values do not change the speed.
#include "../../engine/cuda/backend_cuda.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <vector>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define CUDIE(x)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (x);                                                                      \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));    \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

// Device-to-device copy bandwidth in bytes/s, counting the read and the write.
static double copy_bandwidth(void)
{
    const size_t n = (size_t)2 << 30;
    void *a, *b;
    CUDIE(cudaMalloc(&a, n));
    CUDIE(cudaMalloc(&b, n));
    CUDIE(cudaMemset(a, 1, n));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    CUDIE(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
    cudaEventRecord(e0);
    const int reps = 10;
    for (int i = 0; i < reps; i++)
        cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, n, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1);
    CUDIE(cudaEventSynchronize(e1));
    float ms;
    cudaEventElapsedTime(&ms, e0, e1);
    cudaFree(a), cudaFree(b);
    return 2.0 * n * reps / (ms * 1e-3);
}

// cuBLAS bf16 GEMM rate (FLOP/s) on random data, m = n = k = 8192.
static double gemm_rate(void)
{
    const int N = 8192;
    std::vector<__nv_bfloat16> h((size_t)N * N);
    uint64_t s = 88172645463325252ull;
    for (auto &x : h) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        x = __float2bfloat16((float)((s >> 40) & 0xffff) / 65536.0f - 0.5f);
    }
    __nv_bfloat16 *a, *b, *c;
    CUDIE(cudaMalloc(&a, h.size() * 2));
    CUDIE(cudaMalloc(&b, h.size() * 2));
    CUDIE(cudaMalloc(&c, h.size() * 2));
    CUDIE(cudaMemcpy(a, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    CUDIE(cudaMemcpy(b, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    cublasHandle_t hd;
    cublasCreate(&hd);
    const float one = 1, zero = 0;
    auto run = [&]() {
        cublasGemmEx(hd, CUBLAS_OP_T, CUBLAS_OP_N, N, N, N, &one, a, CUDA_R_16BF, N, b, CUDA_R_16BF,
                     N, &zero, c, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    };
    run();
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    cudaEventRecord(e0);
    const int reps = 20;
    for (int i = 0; i < reps; i++)
        run();
    cudaEventRecord(e1);
    CUDIE(cudaEventSynchronize(e1));
    float ms;
    cudaEventElapsedTime(&ms, e0, e1);
    cublasDestroy(hd);
    cudaFree(a), cudaFree(b), cudaFree(c);
    return 2.0 * N * N * (double)N * reps / (ms * 1e-3);
}

struct shapes {
    const char *name;
    int vocab, hidden, inter, layers, heads, kv_heads, head_dim;
    bool tied;
};
static const shapes llama3_8b = {"Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, 128, false};
static const shapes llama3_1b = {"Llama-3.2-1B", 128256, 2048, 8192, 16, 32, 8, 64, true};

struct synth {
    std::vector<std::vector<uint16_t>> bufs;
    std::vector<se_tensor> t;
    std::vector<se_layer_weights> layers;
    se_weights w;
    se_model_config cfg;
};

static const se_tensor *mk(synth &s, size_t slot, const char *name, int64_t r, int64_t k)
{
    se_tensor &t = s.t[slot];
    std::vector<uint16_t> &b = s.bufs[slot];
    b.resize((size_t)(r * k));
    uint64_t x = 0x9E3779B97F4A7C15ull ^ (slot * 0x1234567ull + 1);
    for (auto &v : b) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        // bf16 values of magnitude about 2^-6, either sign: keeps activations finite.
        v = (uint16_t)(0x3c80 | ((x >> 20) & 0x7f) | ((x >> 40) & 0x8000));
    }
    t.name = name;
    t.dtype = SE_DTYPE_BF16;
    t.n_dims = k == 1 ? 1 : 2;
    t.shape[0] = r;
    t.shape[1] = k;
    t.data = b.data();
    t.nbytes = b.size() * 2;
    return &t;
}

static void build(synth &s, const shapes &m)
{
    memset(&s.cfg, 0, sizeof s.cfg);
    se_model_config &c = s.cfg;
    c.arch = SE_ARCH_LLAMA;
    c.dtype = SE_DTYPE_BF16;
    c.vocab_size = m.vocab;
    c.hidden_size = m.hidden;
    c.intermediate_size = m.inter;
    c.n_layers = m.layers;
    c.n_heads = m.heads;
    c.n_kv_heads = m.kv_heads;
    c.head_dim = m.head_dim;
    c.max_position = 8192;
    c.rms_eps = 1e-5f;
    c.rope_theta = 500000.0f;
    c.rope_llama3 = true;
    c.rope_factor = 8;
    c.rope_low_freq_factor = 1;
    c.rope_high_freq_factor = 4;
    c.rope_original_max_position = 8192;
    c.tie_embeddings = m.tied;
    s.bufs.resize(12);
    s.t.resize(12);
    const int64_t H = m.hidden, Q = (int64_t)m.heads * m.head_dim,
                  KV = (int64_t)m.kv_heads * m.head_dim;
    s.w.embed = mk(s, 0, "embed", m.vocab, H);
    s.w.lm_head = m.tied ? s.w.embed : mk(s, 1, "lm_head", m.vocab, H);
    s.w.final_norm = mk(s, 2, "norm", H, 1);
    se_layer_weights L;
    memset(&L, 0, sizeof L);
    L.attn_norm = L.ffn_norm = s.w.final_norm;
    L.wq = mk(s, 3, "wq", Q, H);
    L.wk = mk(s, 4, "wk", KV, H);
    L.wv = mk(s, 5, "wv", KV, H);
    L.wo = mk(s, 6, "wo", H, Q);
    L.w_gate = mk(s, 7, "w_gate", m.inter, H);
    L.w_up = mk(s, 8, "w_up", m.inter, H);
    L.w_down = mk(s, 9, "w_down", H, m.inter);
    s.layers.assign(m.layers, L);
    s.w.n_layers = m.layers;
    s.w.layers = s.layers.data();
}

static void die_be(const se_backend &be, const char *what)
{
    fprintf(stderr, "engine_gpu: %s: %s\n", what, be.i->last_error(be.ctx));
    exit(1);
}

int main(int argc, char **argv)
{
    const shapes *m = &llama3_8b;
    int prompt = 512, steps = 64;
    std::vector<int> batches = {1, 32, 128, 256};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "1b"))
            m = &llama3_1b;
        else if (!strcmp(argv[i], "8b"))
            m = &llama3_8b;
        else if (!strcmp(argv[i], "--prompt") && i + 1 < argc)
            prompt = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batches") && i + 1 < argc) {
            batches.clear();
            for (char *p = strtok(argv[++i], ","); p; p = strtok(NULL, ","))
                batches.push_back(atoi(p));
        }
    }
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        printf("no GPU: skipped\n");
        return 77;
    }
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    const double bw = copy_bandwidth(), flops = gemm_rate();
    printf("device: %s; copy bandwidth %.0f GB/s; cuBLAS bf16 GEMM %.0f TFLOP/s\n", prop.name,
           bw / 1e9, flops / 1e12);

    synth s;
    build(s, *m);
    se_backend be;
    char err[512];
    int rc = se__backend_cuda_new(0, 0.9f, &be, err, sizeof err);
    if (rc) {
        fprintf(stderr, "engine_gpu: %s\n", err);
        return 1;
    }
    double t0 = now_s();
    if (be.i->load(be.ctx, &s.cfg, &s.w))
        die_be(be, "load");
    const double load_s = now_s() - t0;
    const int bs = 16;
    int maxb = 0;
    for (int b : batches)
        maxb = b > maxb ? b : maxb;
    const int per_seq = (prompt + steps + 8 + bs - 1) / bs;
    const int avail = be.i->kv_blocks_for(be.ctx, 0, bs);
    if (avail < maxb * per_seq) {
        fprintf(stderr, "engine_gpu: KV cache holds %d blocks, batch %d needs %d\n", avail, maxb,
                maxb * per_seq);
        return 1;
    }
    if (be.i->kv_alloc(be.ctx, maxb * per_seq, bs))
        die_be(be, "kv_alloc");

    const double H = m->hidden, Q = (double)m->heads * m->head_dim,
                 KVd = (double)m->kv_heads * m->head_dim;
    const double params = m->layers * (H * (Q + 2 * KVd) + Q * H + 3 * H * m->inter) +
                          (double)m->vocab * H * (m->tied ? 1 : 2);
    // Parameters that pass through a GEMM each step: all but an untied embedding table.
    const double gemm_params = params - (m->tied ? 0.0 : (double)m->vocab * H);
    const double kv_per_tok = 2.0 * m->layers * KVd * 2;
    printf("model: %s shapes, %.2f B parameters (bf16, %.1f GiB), loaded in %.1f s; KV block %d\n",
           m->name, params / 1e9, params * 2 / (1 << 30), load_s, bs);

    struct row {
        char what[64];
        double tps, roof;
    };
    std::vector<row> rows;
    uint64_t rs = 12345;
    for (int B : batches) {
        std::vector<std::vector<int32_t>> bt(B);
        std::vector<const int32_t *> btp(B);
        for (int q = 0; q < B; q++) {
            for (int k = 0; k < per_seq; k++)
                bt[q].push_back(q * per_seq + k);
            btp[q] = bt[q].data();
        }
        // Prefill: passes of up to 2048 tokens, whole prompts.
        const int per_pass = prompt >= 2048 ? 1 : 2048 / prompt;
        std::vector<int32_t> tk, pos, start, ntok, ctx, rowsv;
        std::vector<float> logits((size_t)(per_pass > B ? per_pass : B) * m->vocab);
        double tp = 0;
        long ptoks = 0;
        for (int q0 = 0; q0 < B; q0 += per_pass) {
            const int nq = B - q0 < per_pass ? B - q0 : per_pass;
            tk.clear(), pos.clear(), start.clear(), ntok.clear(), ctx.clear(), rowsv.clear();
            for (int q = 0; q < nq; q++) {
                start.push_back((int32_t)tk.size());
                for (int i = 0; i < prompt; i++) {
                    rs ^= rs << 13, rs ^= rs >> 7, rs ^= rs << 17;
                    tk.push_back((int32_t)(rs % (uint64_t)m->vocab));
                    pos.push_back(i);
                }
                ntok.push_back(prompt);
                ctx.push_back(prompt);
                rowsv.push_back((int32_t)tk.size() - 1);
            }
            se_batch b = {(int)tk.size(),    tk.data(),   pos.data(), nq,
                          start.data(),      ntok.data(), ctx.data(), btp.data() + q0,
                          (int)rowsv.size(), rowsv.data()};
            t0 = now_s();
            if (be.i->forward(be.ctx, &b, logits.data()))
                die_be(be, "prefill");
            if (q0 > 0 || B == 1) { // the first pass of a batch includes buffer growth
                tp += now_s() - t0;
                ptoks += (long)tk.size();
            }
        }
        if (B == maxb && ptoks > 0) {
            row r;
            snprintf(r.what, sizeof r.what, "prefill %d-token prompts", prompt);
            r.tps = ptoks / tp;
            r.roof = flops / (2 * gemm_params);
            rows.push_back(r);
        }
        // Decode: every sequence one token per step, 2 warm-up steps (graph capture).
        tk.assign(B, 1), pos.assign(B, 0), start.resize(B), ntok.assign(B, 1), ctx.resize(B),
            rowsv.resize(B);
        double td = 0;
        for (int st = 0; st < steps + 2; st++) {
            for (int q = 0; q < B; q++) {
                start[q] = q;
                rowsv[q] = q;
                pos[q] = prompt + st;
                ctx[q] = prompt + st + 1;
                rs ^= rs << 13, rs ^= rs >> 7, rs ^= rs << 17;
                tk[q] = (int32_t)(rs % (uint64_t)m->vocab);
            }
            se_batch b = {B,           tk.data(),  pos.data(), B, start.data(),
                          ntok.data(), ctx.data(), btp.data(), B, rowsv.data()};
            t0 = now_s();
            if (be.i->forward(be.ctx, &b, logits.data()))
                die_be(be, "decode");
            if (st >= 2)
                td += now_s() - t0;
        }
        row r;
        snprintf(r.what, sizeof r.what, "decode batch %d", B);
        r.tps = (double)B * steps / td;
        const double ctx_mid = prompt + 2 + steps / 2.0;
        const double bytes = 2 * gemm_params + B * ctx_mid * kv_per_tok;
        const double t_mem = bytes / bw, t_flop = 2 * gemm_params * B / flops;
        r.roof = B / (t_mem > t_flop ? t_mem : t_flop);
        rows.push_back(r);
    }
    be.i->free(be.ctx);

    printf("\n%-28s %14s %18s %7s\n", "engine_gpu", "tokens/s", "roofline tokens/s", "ratio");
    for (const row &r : rows)
        printf("%-28s %14.0f %18.0f %6.0f%%\n", r.what, r.tps, r.roof, 100 * r.tps / r.roof);
    printf("(roofline: decode = batch / max(bytes read / copy bandwidth, GEMM FLOPs / GEMM rate), "
           "bytes = all weights + KV at mid-run context; prefill = GEMM rate / 2 x GEMM params)\n");
    return 0;
}
