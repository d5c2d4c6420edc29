// Sampling on the device, one thread block per row of logits, following
// spool/sample.h exactly:
//   1. penalties on the raw logits: repetition over prompt + generated tokens
//      (as Hugging Face: a negative logit is multiplied by the penalty, a
//      positive one divided), then frequency * count + presence over the
//      generated tokens (as OpenAI);
//   2. temperature 0: greedy, the argmax (ties to the lowest id);
//   3. otherwise p_i = exp((l_i - max) / temperature), and the candidates are
//      ordered by p descending, ties to the lower id. Every filter keeps a
//      prefix of that order, so the candidate set is always "order key >= C"
//      for one threshold C, where the order key of token i is
//      (bits(p_i) << 32) | (0xFFFFFFFF - i) (p_i >= 0, so the bits of the
//      float order like its value). top-k keeps the first k; top-p keeps the
//      shortest prefix whose mass reaches top_p of the top-k mass; min-p keeps
//      p_i >= min_p * p_max (p_max = 1);
//   4. the draw: u = uniform(seed, position), and the token is the first
//      candidate whose cumulative probability exceeds u * (candidate mass).
// Each threshold is found by a bit-by-bit descent over the 64-bit key, each
// step one pass over the row with a fixed-order (deterministic) block sum.
#include "ops.cuh"

#define SE_ST 1024 // threads per block

static __device__ __forceinline__ uint64_t splitmix64(uint64_t x)
{
    uint64_t z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static __device__ __forceinline__ uint64_t order_key(float p, int i)
{
    return ((uint64_t)__float_as_uint(p) << 32) | (uint64_t)(0xFFFFFFFFu - (uint32_t)i);
}

// Order-preserving map of any float (negative included) to uint32.
static __device__ __forceinline__ uint32_t float_key(float x)
{
    const uint32_t u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static __device__ uint64_t block_max_u64(uint64_t v, uint64_t *scratch)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const uint64_t w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    __syncthreads();
    if (lane == 0)
        scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const uint64_t w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// Sum over the row of p_i (count: of 1) for the tokens whose key is >= c.
static __device__ float mass_from(const float *p, int vocab, uint64_t c, bool count, float *scratch)
{
    float acc = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float pi = p[i];
        if (pi > 0.0f && order_key(pi, i) >= c)
            acc += count ? 1.0f : pi;
    }
    return se_block_sum(acc, scratch);
}

// The largest key c >= lo such that mass_from(c) > target (count: >= target);
// returns lo when even mass_from(lo) does not qualify.
static __device__ uint64_t descend(const float *p, int vocab, uint64_t lo, float target, bool count,
                                   bool inclusive, float *scratch)
{
    uint64_t c = 0;
    for (int bit = 63; bit >= 0; bit--) {
        const uint64_t tryc = c | (1ull << bit);
        const float mm = mass_from(p, vocab, tryc > lo ? tryc : lo, count, scratch);
        if (inclusive ? mm >= target : mm > target)
            c = tryc;
    }
    return c > lo ? c : lo;
}

__global__ void __launch_bounds__(SE_ST)
    sample_kernel(const float *__restrict__ logits, int vocab,
                  const se_cu_sample_row *__restrict__ rows, const int32_t *__restrict__ hist,
                  float *__restrict__ work, int32_t *__restrict__ counts,
                  se_cu_sample_out *__restrict__ out)
{
    __shared__ float scratch[32];
    __shared__ uint64_t scratch64[32];
    const int r = blockIdx.x;
    const se_cu_sample_row row = rows[r];
    const float *lg = logits + (size_t)r * vocab;
    float *w = work + (size_t)r * 2 * vocab; // penalised logits
    float *p = w + vocab;                    // unnormalised probabilities
    int32_t *cnt = counts + (size_t)r * vocab;
    const int32_t *ht = hist + row.hist_off;
    const int n_hist = row.n_prompt + row.n_gen;

    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        w[i] = lg[i];
    __syncthreads();
    if (row.repetition_penalty != 1.0f) {
        // Duplicates write the same value, computed from the unmodified logits.
        for (int j = threadIdx.x; j < n_hist; j += blockDim.x) {
            const int tok = ht[j];
            if (tok >= 0 && tok < vocab) {
                const float v = lg[tok];
                w[tok] = v < 0.0f ? v * row.repetition_penalty : v / row.repetition_penalty;
            }
        }
        __syncthreads();
    }
    if (row.presence_penalty != 0.0f || row.frequency_penalty != 0.0f) {
        const int32_t *gen = ht + row.n_prompt;
        for (int j = threadIdx.x; j < row.n_gen; j += blockDim.x)
            if (gen[j] >= 0 && gen[j] < vocab)
                atomicAdd(&cnt[gen[j]], 1);
        __syncthreads();
        // Exactly one occurrence of each token takes its count (and zeroes it).
        for (int j = threadIdx.x; j < row.n_gen; j += blockDim.x) {
            if (gen[j] < 0 || gen[j] >= vocab)
                continue;
            const int c = atomicExch(&cnt[gen[j]], 0);
            if (c > 0)
                w[gen[j]] -= row.frequency_penalty * (float)c + row.presence_penalty;
        }
        __syncthreads();
    }

    if (row.temperature <= 0.0f) {
        uint64_t best = 0;
        float mx = -INFINITY;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const uint64_t k = ((uint64_t)float_key(w[i]) << 32) | (0xFFFFFFFFu - (uint32_t)i);
            best = k > best ? k : best;
            mx = fmaxf(mx, w[i]);
        }
        best = block_max_u64(best, scratch64);
        mx = se_block_max(mx, scratch);
        float z = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            z += expf(w[i] - mx);
        z = se_block_sum(z, scratch);
        if (threadIdx.x == 0) {
            const int tok = (int)(0xFFFFFFFFu - (uint32_t)best);
            out[r].token = tok;
            out[r].logit = w[tok];
            out[r].logprob = w[tok] - mx - logf(z);
        }
        return;
    }

    float mx = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        mx = fmaxf(mx, w[i]);
    mx = se_block_max(mx, scratch);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        p[i] = expf((w[i] - mx) / row.temperature);
    __syncthreads();

    uint64_t c = 1; // every token with p > 0
    if (row.top_k > 0 && row.top_k < vocab)
        c = descend(p, vocab, c, (float)row.top_k, true, true, scratch);
    if (row.top_p < 1.0f) {
        const float total = mass_from(p, vocab, c, false, scratch);
        c = descend(p, vocab, c, row.top_p * total, false, true, scratch);
    }
    if (row.min_p > 0.0f) {
        const uint64_t cm = (uint64_t)__float_as_uint(row.min_p) << 32;
        // Never below the first candidate: it has p = 1 >= min_p.
        c = cm > c ? cm : c;
    }
    const float total = mass_from(p, vocab, c, false, scratch);
    const double u = (double)(splitmix64(row.seed ^ splitmix64(row.position)) >> 11) * 0x1.0p-53;
    const float target = (float)(u * (double)total);
    uint64_t pick;
    if (mass_from(p, vocab, c, false, scratch) > target) {
        pick = descend(p, vocab, c, target, false, false, scratch);
    } else {
        // Rounding left u * total at total: the draw takes the last candidate.
        uint64_t lowest = ~0ull;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const uint64_t k = order_key(p[i], i);
            if (p[i] > 0.0f && k >= c && k < lowest)
                lowest = k;
        }
        pick = ~block_max_u64(~lowest, scratch64);
    }
    if (threadIdx.x == 0) {
        const int tok = (int)(0xFFFFFFFFu - (uint32_t)pick);
        out[r].token = tok;
        out[r].logit = w[tok];
        out[r].logprob = logf(p[tok] / total);
    }
}

int se__cu_sample(struct se_cuda_err *e, cudaStream_t s, const float *logits, int n_rows, int vocab,
                  const struct se_cu_sample_row *rows, const int32_t *hist, float *work,
                  int32_t *counts, struct se_cu_sample_out *out)
{
    if (n_rows <= 0)
        return 0;
    sample_kernel<<<n_rows, SE_ST, 0, s>>>(logits, vocab, rows, hist, work, counts, out);
    SE_CU_CHECK_LAUNCH(e, "sample_kernel");
    return 0;
}
