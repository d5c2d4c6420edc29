/*
 * Fuzzes the config.json parser (engine/model/config.c): any input must give
 * either an error with a message or a config whose sizes are consistent.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../engine/model/weights.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = 0;
    struct se_model_config c;
    char err[512] = "";
    int rc = se__model_parse_config(text, "config.json", &c, err, sizeof(err));
    if (rc != 0 && err[0] == 0)
        abort(); /* every failure explains itself */
    if (rc == 0 &&
        (c.n_heads <= 0 || c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads != 0 || c.head_dim <= 0 ||
         c.head_dim % 2 || c.max_position <= 0 || c.n_eos > SE_MAX_EOS || c.vocab_size <= 0))
        abort();
    free(text);
    return 0;
}
