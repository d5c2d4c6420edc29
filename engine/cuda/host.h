/*
 * Host-side helpers of the CUDA backend that plain C can call (and that the
 * unit tests run on machines without a GPU): number conversions for loading
 * weights, and the rope frequency table.
 */
#ifndef SPOOL_ENGINE_CUDA_HOST_H
#define SPOOL_ENGINE_CUDA_HOST_H

#include <stdint.h>

#include "spool/model.h"

#ifdef __cplusplus
extern "C" {
#endif

/* fp32 -> bf16 bits, rounding to nearest even; NaN stays a (quiet) NaN. */
uint16_t se__cu_f32_to_bf16(float f);
/* IEEE half bits -> fp32, exactly (subnormals, infinities and NaN included). */
float se__cu_f16_to_f32(uint16_t h);
/*
 * The inverse frequencies (head_dim / 2 floats) for rope, with the llama3
 * rescaling when cfg->rope_llama3, as transformers computes them (here in
 * double, rounded to float).
 */
void se__cu_rope_inv_freq(const struct se_model_config *cfg, float *out);

#ifdef __cplusplus
}
#endif

#endif
