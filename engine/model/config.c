/*
 * config.json and generation_config.json of Hugging Face Llama, Mistral and
 * Qwen2 models, with the defaults of transformers' LlamaConfig, MistralConfig
 * and Qwen2Config for fields a file leaves out.
 */
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "spool/error.h"
#include "weights.h"

/* Reads an integer field; absent or null keeps *out (the default). */
static int get_int(json_t *root, const char *key, int *out, bool required, const char *path,
                   char *err, size_t errcap)
{
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        if (!required)
            return 0;
        snprintf(err, errcap, "%s: missing field \"%s\"", path, key);
        return SP_ECORRUPT;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (1 << 30)) {
        snprintf(err, errcap, "%s: field \"%s\" must be a non-negative integer", path, key);
        return SP_ECORRUPT;
    }
    *out = (int)json_integer_value(v);
    return 0;
}

static int get_float(json_t *root, const char *key, float *out, const char *path, char *err,
                     size_t errcap)
{
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_number(v)) {
        snprintf(err, errcap, "%s: field \"%s\" must be a number", path, key);
        return SP_ECORRUPT;
    }
    *out = (float)json_number_value(v);
    return 0;
}

static int parse_rope_scaling(json_t *rs, const char *path, struct se_model_config *c, char *err,
                              size_t errcap)
{
    if (!rs || json_is_null(rs))
        return 0;
    if (!json_is_object(rs)) {
        snprintf(err, errcap, "%s: \"rope_scaling\" must be an object or null", path);
        return SP_ECORRUPT;
    }
    json_t *type = json_object_get(rs, "rope_type");
    if (!type)
        type = json_object_get(rs, "type");
    const char *t = json_is_string(type) ? json_string_value(type) : "";
    if (!strcmp(t, "default"))
        return 0;
    if (strcmp(t, "llama3") != 0) {
        snprintf(err, errcap,
                 "%s: rope_scaling type \"%s\" is not supported (supported: llama3, default)", path,
                 t);
        return SP_EUNSUPPORTED;
    }
    c->rope_llama3 = true;
    c->rope_factor = 8.0f;
    c->rope_low_freq_factor = 1.0f;
    c->rope_high_freq_factor = 4.0f;
    c->rope_original_max_position = 8192;
    int rc;
    if ((rc = get_float(rs, "factor", &c->rope_factor, path, err, errcap)) ||
        (rc = get_float(rs, "low_freq_factor", &c->rope_low_freq_factor, path, err, errcap)) ||
        (rc = get_float(rs, "high_freq_factor", &c->rope_high_freq_factor, path, err, errcap)) ||
        (rc = get_int(rs, "original_max_position_embeddings", &c->rope_original_max_position, false,
                      path, err, errcap)))
        return rc;
    if (c->rope_factor <= 0 || c->rope_high_freq_factor <= c->rope_low_freq_factor ||
        c->rope_low_freq_factor <= 0 || c->rope_original_max_position <= 0) {
        snprintf(err, errcap,
                 "%s: rope_scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor",
                 path);
        return SP_ECORRUPT;
    }
    return 0;
}

/* eos_token_id may be an integer or a list of integers. */
static int parse_eos(json_t *v, const char *path, struct se_model_config *c, char *err,
                     size_t errcap)
{
    if (!v || json_is_null(v))
        return 0;
    json_t *one = NULL;
    size_t n = json_is_array(v) ? json_array_size(v) : 1;
    if (n > SE_MAX_EOS) {
        snprintf(err, errcap, "%s: more than %d eos_token_id values", path, SE_MAX_EOS);
        return SP_EUNSUPPORTED;
    }
    int32_t ids[SE_MAX_EOS];
    for (size_t i = 0; i < n; i++) {
        one = json_is_array(v) ? json_array_get(v, i) : v;
        if (!json_is_integer(one) || json_integer_value(one) < 0 ||
            json_integer_value(one) > INT32_MAX) {
            snprintf(err, errcap, "%s: \"eos_token_id\" must be an integer or a list of integers",
                     path);
            return SP_ECORRUPT;
        }
        ids[i] = (int32_t)json_integer_value(one);
    }
    c->n_eos = (int)n;
    memcpy(c->eos_ids, ids, n * sizeof(ids[0]));
    return 0;
}

static int parse_bos(json_t *v, const char *path, struct se_model_config *c, char *err,
                     size_t errcap)
{
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX) {
        snprintf(err, errcap, "%s: \"bos_token_id\" must be an integer", path);
        return SP_ECORRUPT;
    }
    c->bos_id = (int32_t)json_integer_value(v);
    return 0;
}

int se__model_parse_config(const char *text, const char *path, struct se_model_config *c, char *err,
                           size_t errcap)
{
    memset(c, 0, sizeof(*c));
    json_error_t je;
    json_t *root = json_loads(text, 0, &je);
    if (!root || !json_is_object(root)) {
        if (root)
            snprintf(err, errcap, "%s: not a JSON object", path);
        else
            snprintf(err, errcap, "%s:%d:%d: invalid JSON: %s", path, je.line, je.column, je.text);
        json_decref(root);
        return SP_ECORRUPT;
    }
    int rc = 0;
    json_t *archs = json_object_get(root, "architectures");
    const char *arch = json_is_array(archs) && json_is_string(json_array_get(archs, 0))
                           ? json_string_value(json_array_get(archs, 0))
                           : NULL;
    if (!arch) {
        snprintf(err, errcap, "%s: missing \"architectures\" (a list naming the model class)",
                 path);
        rc = SP_ECORRUPT;
        goto out;
    }
    snprintf(c->arch_name, sizeof(c->arch_name), "%s", arch);
    if (!strcmp(arch, "LlamaForCausalLM"))
        c->arch = SE_ARCH_LLAMA;
    else if (!strcmp(arch, "MistralForCausalLM"))
        c->arch = SE_ARCH_MISTRAL;
    else if (!strcmp(arch, "Qwen2ForCausalLM"))
        c->arch = SE_ARCH_QWEN2;
    else {
        snprintf(err, errcap,
                 "%s: architecture %s is not supported (supported: LlamaForCausalLM, "
                 "MistralForCausalLM, Qwen2ForCausalLM)",
                 path, arch);
        rc = SP_EUNSUPPORTED;
        goto out;
    }
    c->max_position = c->arch == SE_ARCH_LLAMA     ? 2048
                      : c->arch == SE_ARCH_MISTRAL ? 4096 * 32
                                                   : 32768;
    c->rms_eps = 1e-6f;
    c->rope_theta = 10000.0f;
    c->bos_id = -1;
    c->qkv_bias = c->arch == SE_ARCH_QWEN2;
    c->n_kv_heads = -1;
    c->head_dim = -1;
    if ((rc = get_int(root, "vocab_size", &c->vocab_size, true, path, err, errcap)) ||
        (rc = get_int(root, "hidden_size", &c->hidden_size, true, path, err, errcap)) ||
        (rc = get_int(root, "intermediate_size", &c->intermediate_size, true, path, err, errcap)) ||
        (rc = get_int(root, "num_hidden_layers", &c->n_layers, true, path, err, errcap)) ||
        (rc = get_int(root, "num_attention_heads", &c->n_heads, true, path, err, errcap)) ||
        (rc = get_int(root, "num_key_value_heads", &c->n_kv_heads, false, path, err, errcap)) ||
        (rc = get_int(root, "head_dim", &c->head_dim, false, path, err, errcap)) ||
        (rc = get_int(root, "max_position_embeddings", &c->max_position, false, path, err,
                      errcap)) ||
        (rc = get_float(root, "rms_norm_eps", &c->rms_eps, path, err, errcap)) ||
        (rc = get_float(root, "rope_theta", &c->rope_theta, path, err, errcap)) ||
        (rc = parse_rope_scaling(json_object_get(root, "rope_scaling"), path, c, err, errcap)) ||
        (rc = parse_bos(json_object_get(root, "bos_token_id"), path, c, err, errcap)) ||
        (rc = parse_eos(json_object_get(root, "eos_token_id"), path, c, err, errcap)))
        goto out;
    json_t *tie = json_object_get(root, "tie_word_embeddings");
    c->tie_embeddings = json_is_true(tie);
    if (c->n_kv_heads < 0)
        c->n_kv_heads = c->n_heads;
    if (c->vocab_size == 0 || c->hidden_size == 0 || c->intermediate_size == 0 ||
        c->n_layers == 0 || c->n_heads == 0 || c->n_kv_heads == 0 ||
        c->n_heads % c->n_kv_heads != 0) {
        snprintf(err, errcap,
                 "%s: sizes must be positive and num_attention_heads a multiple of "
                 "num_key_value_heads",
                 path);
        rc = SP_ECORRUPT;
        goto out;
    }
    if (c->head_dim <= 0) {
        if (c->hidden_size % c->n_heads) {
            snprintf(err, errcap, "%s: hidden_size is not a multiple of num_attention_heads", path);
            rc = SP_ECORRUPT;
            goto out;
        }
        c->head_dim = c->hidden_size / c->n_heads;
    }
    if (c->head_dim % 2 || c->max_position == 0 || !(c->rms_eps > 0) || !(c->rope_theta > 0)) {
        snprintf(err, errcap,
                 "%s: head_dim must be even, max_position_embeddings, rms_norm_eps and rope_theta "
                 "positive",
                 path);
        rc = SP_ECORRUPT;
        goto out;
    }
    /*
     * Sliding-window attention is not implemented: a window shorter than the
     * context would change results, so the context is limited to the window,
     * within which full attention is exact.
     */
    json_t *sw = json_object_get(root, "sliding_window");
    json_t *use_sw = json_object_get(root, "use_sliding_window");
    bool sw_on = c->arch == SE_ARCH_MISTRAL || json_is_true(use_sw);
    if (sw_on && json_is_integer(sw) && json_integer_value(sw) > 0 &&
        json_integer_value(sw) < c->max_position)
        c->max_position = (int)json_integer_value(sw);
out:
    json_decref(root);
    return rc;
}
