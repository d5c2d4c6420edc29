/*
 * The engine-internal view of an open model: its weights as struct
 * se_weights (backend.h) for a backend's load(). The view and the tensors it
 * points to live as long as the model.
 */
#ifndef SPOOL_ENGINE_WEIGHTS_H
#define SPOOL_ENGINE_WEIGHTS_H

#include "../backend.h"
#include "spool/model.h"

const struct se_weights *se__model_weights(const se_model_t *m);

/*
 * Parses the config.json text in json (path names it in messages) into cfg
 * (all fields but dtype and n_params). Exposed for tests and the fuzzer.
 * Returns 0, SP_ECORRUPT or SP_EUNSUPPORTED with err saying which field.
 */
int se__model_parse_config(const char *json, const char *path, struct se_model_config *cfg,
                           char *err, size_t errcap);

#endif
