/*
 * se_logits: runs a model through the engine's backend interface and writes
 * every logits row, for comparison with tests/tools/ref_forward.py.
 *
 *   se_logits MODEL_DIR OUT.bin GEN_N CHUNK BLOCK_SIZE IDS [IDS ...]
 *
 * Each IDS is a comma-separated prompt. All sequences run together in one
 * flattened batch per pass: each pass gives every sequence its next prompt
 * chunk (the whole prompt, except that sequence 1 is split into chunks of
 * CHUNK tokens: chunked prefill) or, once its prompt is done, its last
 * greedily chosen token (decode), until each has generated GEN_N tokens. KV
 * blocks of BLOCK_SIZE slots are handed out from the top of the cache down as
 * sequences grow, so block tables are neither contiguous nor ordered.
 *
 * OUT.bin holds, for every token fed, int32 sequence, int32 position and
 * vocab_size float32 logits (little-endian). Stdout gets one JSON line:
 * {"generated": [[ids of sequence 0], ...]}. Exit status 0, or 1 with a
 * message on stderr.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu.h"
#include "model/weights.h"
#include "spool/error.h"
#include "spool/model.h"

#define MAX_SEQS 16

struct seq {
    int32_t *ids; /* prompt then generated tokens */
    int n_prompt, n_ids, n_fed, n_gen;
    int32_t *blocks;
    int n_blocks;
};

static int parse_ids(const char *s, struct seq *q, int extra)
{
    int cap = 1;
    for (const char *p = s; *p; p++)
        cap += *p == ',';
    q->ids = calloc((size_t)(cap + extra), sizeof(int32_t));
    char *end;
    for (int k = 0; k < cap; k++) {
        q->ids[k] = (int32_t)strtol(s, &end, 10);
        if (end == s || (*end != ',' && *end != 0))
            return -1;
        s = end + 1;
    }
    q->n_prompt = q->n_ids = cap;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 7 || argc - 6 > MAX_SEQS) {
        fprintf(stderr,
                "usage: se_logits MODEL_DIR OUT.bin GEN_N CHUNK BLOCK_SIZE IDS [IDS ...]\n");
        return 1;
    }
    int gen_n = atoi(argv[3]), chunk = atoi(argv[4]), bs = atoi(argv[5]), n_seqs = argc - 6;
    char err[1024];
    se_model_t *m;
    int rc = se_model_open(argv[1], &m, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "se_logits: %s\n", err);
        return 1;
    }
    const struct se_model_config *cfg = se_model_get_config(m);
    struct seq seqs[MAX_SEQS] = {0};
    int total_blocks = 0, max_tokens = 0;
    for (int s = 0; s < n_seqs; s++) {
        if (parse_ids(argv[6 + s], &seqs[s], gen_n)) {
            fprintf(stderr, "se_logits: bad ids %s\n", argv[6 + s]);
            return 1;
        }
        int len = seqs[s].n_prompt + gen_n;
        seqs[s].blocks = calloc((size_t)(len / bs + 1), sizeof(int32_t));
        total_blocks += len / bs + 1;
        max_tokens += seqs[s].n_prompt;
    }
    int n_blocks = total_blocks + 3, next_block = n_blocks - 1;
    struct se_backend be;
    struct se_cpu_opts opts = {.n_threads = getenv("SE_THREADS") ? atoi(getenv("SE_THREADS")) : 0,
                               .max_tokens = max_tokens};
    if ((rc = se__backend_cpu_new(&opts, &be)) ||
        (rc = be.i->load(be.ctx, cfg, se__model_weights(m))) ||
        (rc = be.i->kv_alloc(be.ctx, n_blocks, bs))) {
        fprintf(stderr, "se_logits: %s\n",
                rc == SP_ENOMEM ? "out of memory" : be.i->last_error(be.ctx));
        return 1;
    }
    FILE *out = fopen(argv[2], "wb");
    if (!out) {
        perror(argv[2]);
        return 1;
    }
    int32_t *tokens = calloc((size_t)max_tokens, 4), *positions = calloc((size_t)max_tokens, 4);
    int32_t *rows = calloc((size_t)max_tokens, 4), *row_seq = calloc((size_t)max_tokens, 4);
    int32_t start[MAX_SEQS], ntok[MAX_SEQS], ctx[MAX_SEQS], idx[MAX_SEQS];
    const int32_t *tables[MAX_SEQS];
    float *logits = malloc((size_t)max_tokens * cfg->vocab_size * sizeof(float));
    for (;;) {
        int n = 0, ns = 0;
        for (int s = 0; s < n_seqs; s++) {
            struct seq *q = &seqs[s];
            int take;
            if (q->n_fed < q->n_prompt)
                take = s == 1 && chunk > 0 && chunk < q->n_prompt - q->n_fed
                           ? chunk
                           : q->n_prompt - q->n_fed;
            else if (q->n_gen < gen_n && q->n_fed < q->n_ids)
                take = 1;
            else
                continue;
            start[ns] = n;
            ntok[ns] = take;
            ctx[ns] = q->n_fed + take;
            while (q->n_blocks * bs < ctx[ns])
                q->blocks[q->n_blocks++] = next_block--;
            tables[ns] = q->blocks;
            idx[ns] = s;
            for (int k = 0; k < take; k++) {
                tokens[n] = q->ids[q->n_fed + k];
                positions[n] = q->n_fed + k;
                rows[n] = n;
                row_seq[n] = s;
                n++;
            }
            ns++;
        }
        if (ns == 0)
            break;
        struct se_batch b = {.n_tokens = n,
                             .tokens = tokens,
                             .positions = positions,
                             .n_seqs = ns,
                             .seq_start = start,
                             .seq_n_tokens = ntok,
                             .seq_ctx_len = ctx,
                             .block_tables = tables,
                             .n_logits = n,
                             .logit_rows = rows};
        if ((rc = be.i->forward(be.ctx, &b, logits))) {
            fprintf(stderr, "se_logits: forward: %s\n", be.i->last_error(be.ctx));
            return 1;
        }
        for (int r = 0; r < n; r++) {
            int32_t hdr[2] = {row_seq[r], positions[r]};
            fwrite(hdr, 4, 2, out);
            fwrite(logits + (size_t)r * cfg->vocab_size, 4, (size_t)cfg->vocab_size, out);
        }
        for (int k = 0; k < ns; k++) {
            struct seq *q = &seqs[idx[k]];
            q->n_fed = ctx[k];
            if (q->n_fed < q->n_prompt || q->n_gen >= gen_n)
                continue;
            const float *lg = logits + (size_t)(start[k] + ntok[k] - 1) * cfg->vocab_size;
            int best = 0;
            for (int v = 1; v < cfg->vocab_size; v++)
                if (lg[v] > lg[best])
                    best = v;
            q->ids[q->n_ids++] = best;
            q->n_gen++;
        }
    }
    fclose(out);
    printf("{\"generated\": [");
    for (int s = 0; s < n_seqs; s++) {
        printf("%s[", s ? ", " : "");
        for (int k = seqs[s].n_prompt; k < seqs[s].n_ids; k++)
            printf("%s%d", k > seqs[s].n_prompt ? ", " : "", seqs[s].ids[k]);
        printf("]");
        free(seqs[s].ids);
        free(seqs[s].blocks);
    }
    printf("]}\n");
    free(tokens);
    free(positions);
    free(rows);
    free(row_seq);
    free(logits);
    be.i->free(be.ctx);
    se_model_close(m);
    return 0;
}
