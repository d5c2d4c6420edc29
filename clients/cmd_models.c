/* `spool models`: looking at Hugging Face model directories. */
#include "cli.h"

#include "spool/error.h"
#include "spool/model.h"

#include <getopt.h>
#include <jansson.h>
#include <string.h>

static const char *human(int64_t n, char *buf, size_t cap)
{
    if (n >= 1000000000)
        snprintf(buf, cap, "%.2fB", n / 1e9);
    else if (n >= 1000000)
        snprintf(buf, cap, "%.1fM", n / 1e6);
    else if (n >= 1000)
        snprintf(buf, cap, "%.1fK", n / 1e3);
    else
        snprintf(buf, cap, "%lld", (long long)n);
    return buf;
}

static int models_inspect(int argc, char **argv)
{
    const char *usage =
        "usage: spool models inspect [--json] DIR\n\n"
        "Opens the Hugging Face model directory DIR (config.json, safetensors weights),\n"
        "checks every tensor, and prints the architecture, parameter count, dtype,\n"
        "context length, vocabulary and layer/head shapes.\n"
        "  --json   print one JSON object\n";
    static const struct option opts[] = {
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    bool json = false;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'j':
            json = true;
            break;
        case 'h':
            fputs(usage, stdout);
            return CLI_OK;
        default:
            return cli_usage_error("spool models inspect", "bad option");
        }
    }
    if (optind != argc - 1)
        return cli_usage_error("spool models inspect", "expected one model directory");
    char err[1024];
    se_model_t *m;
    if (se_model_open(argv[optind], &m, err, sizeof(err)))
        return cli_fail("%s", err);
    const struct se_model_config *c = se_model_get_config(m);
    if (json) {
        json_t *eos = json_array();
        for (int i = 0; i < c->n_eos; i++)
            json_array_append_new(eos, json_integer(c->eos_ids[i]));
        json_t *o = json_pack(
            "{s:s, s:s, s:I, s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:b, s:b, s:o, s:o}",
            "dir", se_model_dir(m), "architecture", c->arch_name, "parameters",
            (json_int_t)c->n_params, "dtype", se_dtype_name(c->dtype), "context_length",
            c->max_position, "vocab_size", c->vocab_size, "hidden_size", c->hidden_size,
            "intermediate_size", c->intermediate_size, "layers", c->n_layers, "heads", c->n_heads,
            "kv_heads", c->n_kv_heads, "head_dim", c->head_dim, "rope_theta", (double)c->rope_theta,
            "tied_embeddings", c->tie_embeddings, "qkv_bias", c->qkv_bias, "bos_token_id",
            c->bos_id >= 0 ? json_integer(c->bos_id) : json_null(), "eos_token_ids", eos);
        char *s = json_dumps(o, JSON_COMPACT);
        puts(s);
        free(s);
        json_decref(o);
    } else {
        char hb[32];
        printf("model           %s\n", se_model_dir(m));
        printf("architecture    %s\n", c->arch_name);
        printf("parameters      %s (%lld)\n", human(c->n_params, hb, sizeof(hb)),
               (long long)c->n_params);
        printf("dtype           %s\n", se_dtype_name(c->dtype));
        printf("context length  %d\n", c->max_position);
        printf("vocabulary      %d\n", c->vocab_size);
        printf("layers          %d (hidden %d, intermediate %d)\n", c->n_layers, c->hidden_size,
               c->intermediate_size);
        printf("heads           %d query, %d key/value, head_dim %d\n", c->n_heads, c->n_kv_heads,
               c->head_dim);
        printf("rope            theta %g%s\n", (double)c->rope_theta,
               c->rope_llama3 ? ", llama3 scaling" : "");
        printf("embeddings      %s\n", c->tie_embeddings ? "tied" : "separate lm_head");
        printf("eos             ");
        for (int i = 0; i < c->n_eos; i++)
            printf("%s%d", i ? ", " : "", c->eos_ids[i]);
        printf("%s\n", c->n_eos ? "" : "none");
    }
    se_model_close(m);
    return CLI_OK;
}

static const struct cli_cmd models_commands[] = {
    {"inspect", "describe a Hugging Face model directory", models_inspect},
    {"push", "register a model directory as the next version of a name", models_push},
    {"list", "list registered models", models_list},
    {"show", "show a registered model's versions (NAME) or one version (NAME@V)", models_show},
    {"alias", "point an alias (prod, canary, ...) at a version", models_alias},
    {NULL, NULL, NULL},
};

int cmd_models(int argc, char **argv)
{
    return cli_dispatch("spool models", "Model directories.", models_commands, argc, argv);
}
