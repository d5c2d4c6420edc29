/*
 * Sample frames of every type, shared by the wire unit test and its corpus
 * writer. wire_sample(type, full, f) fills f with caller-owned static data:
 * full = every field, optional ones included; !full = optional ones absent.
 */
#ifndef SPOOL_TEST_WIRE_SAMPLES_H
#define SPOOL_TEST_WIRE_SAMPLES_H

#include <math.h>
#include <string.h>

#include "spool/wire.h"

static struct sp_wire_model sample_models[] = {
    {"llama-3-8b-instruct", 3,
     "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"},
    {"qwen2-0.5b", 1, "sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"},
};
static int32_t sample_tokens[] = {1, 15043, 29892, 3186, 0, 2147483647};
static float sample_logprobs[] = {-0.25f, -1.5f, 0.0f, -12.75f, -3.0e-7f, -INFINITY};
static int32_t sample_stop_ids[] = {128001, 128009};
static const char *sample_stop[] = {"\n\nUser:", "</s>"};
static const char sample_text[] = "caf\xc3\xa9 \0 NUL inside"; /* text may hold a NUL byte */

static inline void wire_sample(enum sp_wire_type type, int full, struct sp_wire_frame *f)
{
    memset(f, 0, sizeof *f);
    f->type = type;
    switch (type) {
    case SP_WIRE_REGISTER:
        f->reg.name = "worker-a100-7";
        f->reg.gpu_type = "A100-80GB";
        f->reg.gpu_memory = 85899345920ull;
        f->reg.capacity = full ? SP_WIRE_ON_DEMAND : SP_WIRE_SPOT;
        f->reg.price_per_hour = 1.89;
        f->reg.models = full ? sample_models : NULL;
        f->reg.n_models = full ? 2 : 0;
        f->reg.max_batch = 256;
        f->reg.backend = "cuda";
        f->reg.has_worker_id = full;
        f->reg.worker_id = full ? 42 : 0;
        break;
    case SP_WIRE_REGISTERED:
        f->registered = (struct sp_wire_registered){UINT64_MAX, 1000, 15000};
        break;
    case SP_WIRE_HEARTBEAT:
        f->heartbeat = (struct sp_wire_heartbeat){42, 17, 1023, 4096, 240, 9};
        break;
    case SP_WIRE_ASSIGN:
        f->assign =
            (struct sp_wire_assign){7001, 99, 0x8000000000000001ull, sample_models[0], 30000};
        break;
    case SP_WIRE_PROGRESS:
        f->progress = (struct sp_wire_progress){7001, 5, 120, 98304};
        break;
    case SP_WIRE_DONE:
        f->done = (struct sp_wire_done){7001, 5, 998, 2};
        break;
    case SP_WIRE_RELEASE:
        f->release = (struct sp_wire_release){7001, 5, "preempted"};
        break;
    case SP_WIRE_DRAIN:
        f->drain = (struct sp_wire_drain){"spot notice", 110000};
        break;
    case SP_WIRE_GOODBYE:
        f->goodbye.reason = full ? "shutting down" : "";
        break;
    case SP_WIRE_LIVE_REQUEST: {
        struct sp_wire_live_request *l = &f->live;
        l->request_id = 1ull << 40;
        l->model.name = "qwen2-0.5b";
        l->model.version = 1;
        l->model.digest = full ? sample_models[1].digest : NULL;
        if (full) {
            l->prompt.is_text = false;
            l->prompt.tokens = sample_tokens;
            l->prompt.n_tokens = 6;
            struct sp_wire_sampling *s = &l->sampling;
            s->has_temperature = s->has_top_k = s->has_top_p = s->has_min_p = true;
            s->has_repetition_penalty = s->has_presence_penalty = true;
            s->has_frequency_penalty = s->has_seed = s->has_max_tokens = true;
            s->has_logprobs = s->has_ignore_eos = true;
            s->temperature = 0.7;
            s->top_k = 40;
            s->top_p = 0.95;
            s->min_p = 0.05;
            s->repetition_penalty = 1.1;
            s->presence_penalty = -0.5;
            s->frequency_penalty = 0.25;
            s->seed = 0xdeadbeefcafef00dull;
            s->max_tokens = 512;
            s->logprobs = 5;
            s->ignore_eos = true;
            s->stop_ids = sample_stop_ids;
            s->n_stop_ids = 2;
            s->stop = sample_stop;
            s->n_stop = 2;
            static struct sp_wire_message msgs[2] = {{"system", "Be brief."},
                                                     {"user", "Name a queue."}};
            l->messages = msgs;
            l->n_messages = 2;
        } else {
            l->prompt.is_text = true;
            l->prompt.text = "Write a haiku about queues.";
            l->prompt.text_len = strlen(l->prompt.text);
        }
        l->priority = full ? -3 : 10;
        break;
    }
    case SP_WIRE_TOKENS:
        f->tokens.request_id = 1ull << 40;
        f->tokens.token_ids = sample_tokens;
        f->tokens.n_token_ids = 6;
        f->tokens.text = sample_text;
        f->tokens.text_len = sizeof sample_text - 1;
        f->tokens.finish_reason = full ? "length" : NULL;
        f->tokens.logprobs = full ? sample_logprobs : NULL;
        f->tokens.n_logprobs = full ? 6 : 0;
        break;
    case SP_WIRE_CANCEL:
        f->cancel.request_id = 12345;
        break;
    case SP_WIRE_USAGE:
        if (full) {
            f->usage.has_shard_id = true;
            f->usage.shard_id = 7001;
        } else {
            f->usage.has_request_id = true;
            f->usage.request_id = 12345;
        }
        f->usage.tokens_in = 1000000;
        f->usage.tokens_out = 250000;
        f->usage.gpu_seconds = 37.125;
        break;
    case SP_WIRE_ERROR:
        f->error.code = "SP_ECONTEXT";
        f->error.message = "request 12345: prompt of 9000 tokens is longer than the context (8192)";
        f->error.has_request_id = full;
        f->error.request_id = full ? 12345 : 0;
        break;
    case SP_WIRE_REVOKE:
        f->revoke = (struct sp_wire_revoke){7001, 5, "cancelled"};
        break;
    default:
        break;
    }
}

#endif
