/*
 * Models: a Hugging Face model directory (config.json, model.safetensors or
 * sharded model-*.safetensors with model.safetensors.index.json,
 * generation_config.json) for LlamaForCausalLM, MistralForCausalLM and
 * Qwen2ForCausalLM. Weights are memory-mapped, never copied on open.
 */
#ifndef SPOOL_MODEL_H
#define SPOOL_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum se_arch { SE_ARCH_LLAMA, SE_ARCH_MISTRAL, SE_ARCH_QWEN2 };
enum se_dtype { SE_DTYPE_F32, SE_DTYPE_F16, SE_DTYPE_BF16 };

#define SE_MAX_EOS 8

struct se_model_config {
    enum se_arch arch;
    char arch_name[64];  /* as in config.json "architectures"[0] */
    enum se_dtype dtype; /* storage dtype of the weights */
    int vocab_size;
    int hidden_size;       /* d_model */
    int intermediate_size; /* SwiGLU hidden width */
    int n_layers;
    int n_heads;
    int n_kv_heads;   /* grouped-query attention: n_heads % n_kv_heads == 0 */
    int head_dim;     /* usually hidden_size / n_heads */
    int max_position; /* context length (max_position_embeddings) */
    float rms_eps;
    float rope_theta;
    /* Llama 3 rope_scaling ("rope_type": "llama3"); off when !rope_llama3. */
    bool rope_llama3;
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_original_max_position;
    bool tie_embeddings; /* lm_head shares embed_tokens */
    bool qkv_bias;       /* Qwen2: q/k/v projections have biases */
    int32_t bos_id;      /* -1 when none */
    int n_eos;
    int32_t eos_ids[SE_MAX_EOS]; /* from generation_config.json, else config.json */
    int64_t n_params;            /* counted from the tensors */
};

typedef struct se_model se_model_t;

/*
 * Opens the model in dir: parses config.json (and generation_config.json when
 * present), maps the safetensors files and checks every tensor the
 * architecture needs is present with the right shape and a supported dtype.
 * Returns 0, or SP_ENOENT / SP_ECORRUPT / SP_EUNSUPPORTED with err naming the
 * file (and tensor) and what was wrong.
 */
int se_model_open(const char *dir, se_model_t **out, char *err, size_t errcap);
void se_model_close(se_model_t *m);
const struct se_model_config *se_model_get_config(const se_model_t *m);
const char *se_model_dir(const se_model_t *m);
const char *se_dtype_name(enum se_dtype t);

#endif
