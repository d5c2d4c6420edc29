/*
 * Fuzzes the safetensors header parser (engine/model/safetensors.c) on whole
 * files. Every tensor it accepts must lie inside the input: the driver reads
 * every byte of each, so a bad bounds check shows up under ASan.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "../../engine/model/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct se_tensor *t;
    int n;
    char err[512];
    if (se__st_parse(data, size, &t, &n, err, sizeof(err)) != 0)
        return 0;
    volatile uint8_t sink = 0;
    for (int i = 0; i < n; i++) {
        const uint8_t *p = t[i].data;
        if (p < data || p + t[i].nbytes > data + size)
            abort();
        for (size_t k = 0; k < t[i].nbytes; k++)
            sink ^= p[k];
    }
    (void)sink;
    se__st_free_tensors(t, n);
    return 0;
}
