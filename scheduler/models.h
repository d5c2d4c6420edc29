/*
 * GET /v1/models and GET /v1/models/{id} (models.c): the model registry in
 * OpenAI's list shape.
 */
#ifndef SPOOL_SCHEDULER_MODELS_H
#define SPOOL_SCHEDULER_MODELS_H

#include "http.h"

extern const struct sh_route sched_models_routes[];
extern const int sched_models_n_routes;

#endif
