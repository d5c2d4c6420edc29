/*
 * se_model_open: a Hugging Face model directory, its config and its mapped
 * safetensors, checked against what the architecture needs.
 */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"
#include "spool/error.h"
#include "spool/log.h"
#include "spool/model.h"
#include "weights.h"

struct se_model {
    char *dir;
    struct se_model_config cfg;
    int n_files;
    struct se_st_file *files;
    int n_tensors;
    const struct se_tensor **sorted; /* all tensors of all files, by name */
    struct se_weights weights;
    struct se_layer_weights *layers;
};

const char *se_dtype_name(enum se_dtype t)
{
    switch (t) {
    case SE_DTYPE_F32:
        return "float32";
    case SE_DTYPE_F16:
        return "float16";
    case SE_DTYPE_BF16:
        return "bfloat16";
    }
    return "unknown";
}

const struct se_model_config *se_model_get_config(const se_model_t *m)
{
    return &m->cfg;
}

const char *se_model_dir(const se_model_t *m)
{
    return m->dir;
}

const struct se_weights *se__model_weights(const se_model_t *m)
{
    return &m->weights;
}

/* Reads a whole (small) text file; NULL with errno set on failure. */
static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 8192;
            if (cap > (64u << 20)) {
                errno = EFBIG;
                goto fail;
            }
            char *nb = realloc(buf, cap);
            if (!nb)
                goto fail;
            buf = nb;
        }
        size_t r = fread(buf + len, 1, cap - len - 1, f);
        len += r;
        if (r == 0)
            break;
    }
    if (ferror(f))
        goto fail;
    fclose(f);
    buf[len] = 0;
    return buf;
fail:
    free(buf);
    fclose(f);
    return NULL;
}

static int cmp_tensor_ptr(const void *a, const void *b)
{
    const struct se_tensor *x = *(const struct se_tensor *const *)a;
    const struct se_tensor *y = *(const struct se_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static const struct se_tensor *find_tensor(const se_model_t *m, const char *name)
{
    struct se_tensor key = {.name = name};
    const struct se_tensor *kp = &key;
    const struct se_tensor **hit =
        bsearch(&kp, m->sorted, (size_t)m->n_tensors, sizeof(*m->sorted), cmp_tensor_ptr);
    return hit ? *hit : NULL;
}

static const char *file_of(const se_model_t *m, const struct se_tensor *t)
{
    for (int i = 0; i < m->n_files; i++) {
        const uint8_t *base = m->files[i].map;
        if ((const uint8_t *)t->data >= base && (const uint8_t *)t->data <= base + m->files[i].size)
            return m->files[i].path;
    }
    return m->dir;
}

static int add_file(se_model_t *m, const char *name, char *err, size_t errcap)
{
    for (int i = 0; i < m->n_files; i++) {
        const char *p = strrchr(m->files[i].path, '/');
        if (!strcmp(p ? p + 1 : m->files[i].path, name))
            return 0;
    }
    if (strchr(name, '/') || !strcmp(name, "..") || !*name) {
        snprintf(err, errcap, "%s/model.safetensors.index.json: bad shard file name \"%s\"", m->dir,
                 name);
        return SP_ECORRUPT;
    }
    struct se_st_file *nf = realloc(m->files, (size_t)(m->n_files + 1) * sizeof(*nf));
    if (!nf)
        return SP_ENOMEM;
    m->files = nf;
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", m->dir, name);
    int rc = se__st_open(path, &m->files[m->n_files], err, errcap);
    if (rc)
        return rc;
    m->n_files++;
    return 0;
}

/* Maps model.safetensors, or every shard named in model.safetensors.index.json. */
static int map_files(se_model_t *m, char *err, size_t errcap)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", m->dir);
    json_error_t je;
    json_t *idx = json_load_file(path, 0, &je);
    if (!idx) {
        FILE *probe = fopen(path, "rb");
        if (probe) {
            fclose(probe);
            snprintf(err, errcap, "%s:%d:%d: invalid JSON: %s", path, je.line, je.column, je.text);
            return SP_ECORRUPT;
        }
        snprintf(path, sizeof(path), "%s/model.safetensors", m->dir);
        int rc = add_file(m, "model.safetensors", err, errcap);
        if (rc == SP_ENOENT)
            snprintf(err, errcap,
                     "%s: no model.safetensors or model.safetensors.index.json in the model "
                     "directory",
                     m->dir);
        return rc;
    }
    int rc = 0;
    json_t *wm = json_object_get(idx, "weight_map");
    if (!json_is_object(wm)) {
        snprintf(err, errcap, "%s: missing \"weight_map\" object", path);
        rc = SP_ECORRUPT;
        goto out;
    }
    const char *key;
    json_t *val;
    json_object_foreach(wm, key, val)
    {
        if (!json_is_string(val)) {
            snprintf(err, errcap, "%s: weight_map[\"%s\"] must be a file name", path, key);
            rc = SP_ECORRUPT;
            goto out;
        }
        if ((rc = add_file(m, json_string_value(val), err, errcap)))
            goto out;
    }
    if (m->n_files == 0) {
        snprintf(err, errcap, "%s: weight_map is empty", path);
        rc = SP_ECORRUPT;
    }
out:
    json_decref(idx);
    return rc;
}

static int index_tensors(se_model_t *m, char *err, size_t errcap)
{
    int n = 0;
    for (int i = 0; i < m->n_files; i++)
        n += m->files[i].n_tensors;
    m->sorted = calloc(n ? (size_t)n : 1, sizeof(*m->sorted));
    if (!m->sorted)
        return SP_ENOMEM;
    for (int i = 0; i < m->n_files; i++)
        for (int j = 0; j < m->files[i].n_tensors; j++)
            m->sorted[m->n_tensors++] = &m->files[i].tensors[j];
    qsort(m->sorted, (size_t)n, sizeof(*m->sorted), cmp_tensor_ptr);
    for (int i = 1; i < n; i++)
        if (!strcmp(m->sorted[i]->name, m->sorted[i - 1]->name)) {
            snprintf(err, errcap, "%s: tensor %s appears in %s and %s", m->dir, m->sorted[i]->name,
                     file_of(m, m->sorted[i - 1]), file_of(m, m->sorted[i]));
            return SP_ECORRUPT;
        }
    return 0;
}

static void shape_str(char *buf, size_t cap, int nd, const int64_t *shape)
{
    size_t o = 0;
    o += (size_t)snprintf(buf + o, cap - o, "(");
    for (int i = 0; i < nd && o < cap; i++)
        o += (size_t)snprintf(buf + o, cap - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (o < cap)
        snprintf(buf + o, cap - o, ")");
}

/* Finds name, checking its shape is (d0) or (d0, d1) (d1 = 0 for a vector). */
static int need(se_model_t *m, const char *name, int64_t d0, int64_t d1,
                const struct se_tensor **out, char *err, size_t errcap)
{
    const struct se_tensor *t = find_tensor(m, name);
    if (!t) {
        snprintf(err, errcap, "%s: missing tensor %s (needed by %s)",
                 m->n_files == 1 ? m->files[0].path : m->dir, name, m->cfg.arch_name);
        return SP_ECORRUPT;
    }
    int64_t want[2] = {d0, d1};
    int nd = d1 ? 2 : 1;
    bool ok = t->n_dims == nd && t->shape[0] == d0 && (nd == 1 || t->shape[1] == d1);
    if (!ok) {
        char ws[64], fs[96];
        shape_str(ws, sizeof(ws), nd, want);
        shape_str(fs, sizeof(fs), t->n_dims, t->shape);
        snprintf(err, errcap, "%s: tensor %s has shape %s, expected %s from config.json",
                 file_of(m, t), name, fs, ws);
        return SP_ECORRUPT;
    }
    *out = t;
    m->cfg.n_params += d1 ? d0 * d1 : d0;
    return 0;
}

static int build_weights(se_model_t *m, char *err, size_t errcap)
{
    const struct se_model_config *c = &m->cfg;
    int64_t h = c->hidden_size, q = (int64_t)c->n_heads * c->head_dim,
            kv = (int64_t)c->n_kv_heads * c->head_dim, f = c->intermediate_size;
    struct se_weights *w = &m->weights;
    m->layers = calloc((size_t)c->n_layers, sizeof(*m->layers));
    if (!m->layers)
        return SP_ENOMEM;
    w->n_layers = c->n_layers;
    w->layers = m->layers;
    int rc;
    if ((rc = need(m, "model.embed_tokens.weight", c->vocab_size, h, &w->embed, err, errcap)) ||
        (rc = need(m, "model.norm.weight", h, 0, &w->final_norm, err, errcap)))
        return rc;
    if (c->tie_embeddings) {
        w->lm_head = w->embed;
    } else if ((rc = need(m, "lm_head.weight", c->vocab_size, h, &w->lm_head, err, errcap))) {
        return rc;
    }
    for (int i = 0; i < c->n_layers; i++) {
        struct se_layer_weights *L = &m->layers[i];
        char n[128];
#define NEED(field, suffix, a, b)                                                                  \
    do {                                                                                           \
        snprintf(n, sizeof(n), "model.layers.%d.%s", i, suffix);                                   \
        if ((rc = need(m, n, a, b, &L->field, err, errcap)))                                       \
            return rc;                                                                             \
    } while (0)
        NEED(attn_norm, "input_layernorm.weight", h, 0);
        NEED(ffn_norm, "post_attention_layernorm.weight", h, 0);
        NEED(wq, "self_attn.q_proj.weight", q, h);
        NEED(wk, "self_attn.k_proj.weight", kv, h);
        NEED(wv, "self_attn.v_proj.weight", kv, h);
        NEED(wo, "self_attn.o_proj.weight", h, q);
        if (c->qkv_bias) {
            NEED(bq, "self_attn.q_proj.bias", q, 0);
            NEED(bk, "self_attn.k_proj.bias", kv, 0);
            NEED(bv, "self_attn.v_proj.bias", kv, 0);
        }
        NEED(w_gate, "mlp.gate_proj.weight", f, h);
        NEED(w_up, "mlp.up_proj.weight", f, h);
        NEED(w_down, "mlp.down_proj.weight", h, f);
#undef NEED
    }
    m->cfg.dtype = w->embed->dtype;
    return 0;
}

static int read_generation_config(se_model_t *m, char *err, size_t errcap)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/generation_config.json", m->dir);
    json_error_t je;
    json_t *g = json_load_file(path, 0, &je);
    if (!g) {
        FILE *probe = fopen(path, "rb");
        if (!probe)
            return 0;
        fclose(probe);
        snprintf(err, errcap, "%s:%d:%d: invalid JSON: %s", path, je.line, je.column, je.text);
        return SP_ECORRUPT;
    }
    /* generation_config.json's eos/bos override config.json's, as in transformers. */
    int rc = 0;
    json_t *eos = json_object_get(g, "eos_token_id");
    json_t *bos = json_object_get(g, "bos_token_id");
    if (eos && !json_is_null(eos)) {
        json_t *arr = json_is_array(eos) ? json_incref(eos) : json_pack("[O]", eos);
        size_t n = json_array_size(arr);
        if (n > SE_MAX_EOS) {
            snprintf(err, errcap, "%s: more than %d eos_token_id values", path, SE_MAX_EOS);
            rc = SP_EUNSUPPORTED;
        }
        for (size_t i = 0; !rc && i < n; i++) {
            json_t *v = json_array_get(arr, i);
            if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                json_integer_value(v) > INT32_MAX) {
                snprintf(err, errcap, "%s: \"eos_token_id\" must be an integer or a list", path);
                rc = SP_ECORRUPT;
            } else {
                m->cfg.eos_ids[i] = (int32_t)json_integer_value(v);
            }
        }
        if (!rc)
            m->cfg.n_eos = (int)n;
        json_decref(arr);
    }
    if (!rc && bos && !json_is_null(bos)) {
        if (!json_is_integer(bos) || json_integer_value(bos) < 0 ||
            json_integer_value(bos) > INT32_MAX) {
            snprintf(err, errcap, "%s: \"bos_token_id\" must be an integer", path);
            rc = SP_ECORRUPT;
        } else {
            m->cfg.bos_id = (int32_t)json_integer_value(bos);
        }
    }
    json_decref(g);
    return rc;
}

int se_model_open(const char *dir, se_model_t **out, char *err, size_t errcap)
{
    *out = NULL;
    se_model_t *m = calloc(1, sizeof(*m));
    if (!m || !(m->dir = strdup(dir))) {
        free(m);
        snprintf(err, errcap, "out of memory");
        return SP_ENOMEM;
    }
    size_t dl = strlen(m->dir);
    while (dl > 1 && m->dir[dl - 1] == '/')
        m->dir[--dl] = 0;
    char path[4096];
    snprintf(path, sizeof(path), "%s/config.json", m->dir);
    int rc;
    char *text = read_text(path);
    if (!text) {
        snprintf(err, errcap, "%s: %s (is %s a Hugging Face model directory?)", path,
                 strerror(errno), m->dir);
        rc = errno == ENOENT || errno == ENOTDIR ? SP_ENOENT : SP_EIO;
        goto fail;
    }
    rc = se__model_parse_config(text, path, &m->cfg, err, errcap);
    free(text);
    if (rc || (rc = read_generation_config(m, err, errcap)) || (rc = map_files(m, err, errcap)) ||
        (rc = index_tensors(m, err, errcap)) || (rc = build_weights(m, err, errcap)))
        goto fail;
    sp_debug("model %s: %s, %lld parameters, %s", m->dir, m->cfg.arch_name,
             (long long)m->cfg.n_params, se_dtype_name(m->cfg.dtype));
    *out = m;
    return 0;
fail:
    if (rc == SP_ENOMEM)
        snprintf(err, errcap, "%s: out of memory", m->dir);
    se_model_close(m);
    return rc;
}

void se_model_close(se_model_t *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->n_files; i++)
        se__st_close(&m->files[i]);
    free(m->files);
    free(m->sorted);
    free(m->layers);
    free(m->dir);
    free(m);
}
