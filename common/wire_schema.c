/*
 * The body of every frame type as a table of fields. docs/protocol.md lists
 * the same fields for people; keep the two in step.
 */
#include <stddef.h>

#include "wire_int.h"

#define REQ(S, key, kind, m)                                                                       \
    {                                                                                              \
#key, kind, WF_REQUIRED, offsetof(S, m), -1, -1, NULL                                      \
    }
#define OPT(S, key, kind, m)                                                                       \
    {                                                                                              \
#key, kind, 0, offsetof(S, m), offsetof(S, has_##m), -1, NULL                              \
    }
#define OPTSTR(S, key, m)                                                                          \
    {                                                                                              \
#key, WK_STR, 0, offsetof(S, m), -1, -1, NULL                                              \
    }
#define ARR(S, key, kind, flags, m, n)                                                             \
    {                                                                                              \
#key, kind, flags, offsetof(S, m), -1, offsetof(S, n), NULL                                \
    }
#define SUB(S, key, kind, m, n, sub)                                                               \
    {                                                                                              \
#key, kind, WF_REQUIRED, offsetof(S, m), -1, n, &sub                                       \
    }
#define SCHEMA(var, label, S, fields)                                                              \
    static const struct wire_schema var = {label, sizeof(S), fields,                               \
                                           sizeof fields / sizeof fields[0]}

#define M struct sp_wire_model
static const struct wire_field model_pinned_fields[] = {
    REQ(M, name, WK_STR, name),
    REQ(M, version, WK_U32, version),
    REQ(M, digest, WK_STR, digest),
};
static const struct wire_field model_ref_fields[] = {
    REQ(M, name, WK_STR, name),
    REQ(M, version, WK_U32, version),
    OPTSTR(M, digest, digest),
};
SCHEMA(model_pinned, "model", M, model_pinned_fields);
SCHEMA(model_ref, "model", M, model_ref_fields);
#undef M

#define S struct sp_wire_register
static const struct wire_field register_fields[] = {
    REQ(S, name, WK_STR, name),
    REQ(S, gpu_type, WK_STR, gpu_type),
    REQ(S, gpu_memory, WK_U64, gpu_memory),
    REQ(S, capacity, WK_CAPACITY, capacity),
    REQ(S, price_per_hour, WK_F64, price_per_hour),
    SUB(S, models, WK_STRUCT_ARRAY, models, offsetof(S, n_models), model_pinned),
    REQ(S, max_batch, WK_U32, max_batch),
    REQ(S, backend, WK_STR, backend),
    OPT(S, worker_id, WK_U64, worker_id),
};
SCHEMA(register_schema, "REGISTER", S, register_fields);
#undef S

#define S struct sp_wire_registered
static const struct wire_field registered_fields[] = {
    REQ(S, worker_id, WK_U64, worker_id),
    REQ(S, heartbeat_ms, WK_U32, heartbeat_ms),
    REQ(S, lease_ttl_ms, WK_U32, lease_ttl_ms),
};
SCHEMA(registered_schema, "REGISTERED", S, registered_fields);
#undef S

#define S struct sp_wire_heartbeat
static const struct wire_field heartbeat_fields[] = {
    REQ(S, worker_id, WK_U64, worker_id),
    REQ(S, free_slots, WK_U32, free_slots),
    REQ(S, kv_blocks_free, WK_U32, kv_blocks_free),
    REQ(S, kv_blocks_total, WK_U32, kv_blocks_total),
    REQ(S, running, WK_U32, running),
    REQ(S, queued, WK_U32, queued),
};
SCHEMA(heartbeat_schema, "HEARTBEAT", S, heartbeat_fields);
#undef S

#define S struct sp_wire_assign
static const struct wire_field assign_fields[] = {
    REQ(S, shard_id, WK_U64, shard_id),       REQ(S, job_id, WK_U64, job_id),
    REQ(S, lease_token, WK_U64, lease_token), SUB(S, model, WK_STRUCT, model, -1, model_pinned),
    REQ(S, lease_ms, WK_U32, lease_ms),
};
SCHEMA(assign_schema, "ASSIGN", S, assign_fields);
#undef S

#define S struct sp_wire_progress
static const struct wire_field progress_fields[] = {
    REQ(S, shard_id, WK_U64, shard_id),
    REQ(S, lease_token, WK_U64, lease_token),
    REQ(S, requests_done, WK_U64, requests_done),
    REQ(S, tokens_out, WK_U64, tokens_out),
};
SCHEMA(progress_schema, "PROGRESS", S, progress_fields);
#undef S

#define S struct sp_wire_done
static const struct wire_field done_fields[] = {
    REQ(S, shard_id, WK_U64, shard_id),
    REQ(S, lease_token, WK_U64, lease_token),
    REQ(S, succeeded, WK_U64, succeeded),
    REQ(S, failed, WK_U64, failed),
};
SCHEMA(done_schema, "DONE", S, done_fields);
#undef S

#define S struct sp_wire_release
static const struct wire_field release_fields[] = {
    REQ(S, shard_id, WK_U64, shard_id),
    REQ(S, lease_token, WK_U64, lease_token),
    REQ(S, reason, WK_STR, reason),
};
SCHEMA(release_schema, "RELEASE", S, release_fields);
#undef S

#define S struct sp_wire_drain
static const struct wire_field drain_fields[] = {
    REQ(S, reason, WK_STR, reason),
    REQ(S, deadline_ms, WK_U32, deadline_ms),
};
SCHEMA(drain_schema, "DRAIN", S, drain_fields);
#undef S

#define S struct sp_wire_goodbye
static const struct wire_field goodbye_fields[] = {
    REQ(S, reason, WK_STR, reason),
};
SCHEMA(goodbye_schema, "GOODBYE", S, goodbye_fields);
#undef S

#define S struct sp_wire_sampling
static const struct wire_field sampling_fields[] = {
    OPT(S, temperature, WK_F64, temperature),
    OPT(S, top_k, WK_I32, top_k),
    OPT(S, top_p, WK_F64, top_p),
    OPT(S, min_p, WK_F64, min_p),
    OPT(S, repetition_penalty, WK_F64, repetition_penalty),
    OPT(S, presence_penalty, WK_F64, presence_penalty),
    OPT(S, frequency_penalty, WK_F64, frequency_penalty),
    OPT(S, seed, WK_U64, seed),
    OPT(S, max_tokens, WK_U32, max_tokens),
    OPT(S, logprobs, WK_U32, logprobs),
    OPT(S, ignore_eos, WK_BOOL, ignore_eos),
    ARR(S, stop_ids, WK_TOKEN_ARRAY, 0, stop_ids, n_stop_ids),
    ARR(S, stop, WK_STR_ARRAY, 0, stop, n_stop),
};
SCHEMA(sampling_schema, "sampling", S, sampling_fields);
#undef S

#define S struct sp_wire_message
static const struct wire_field message_fields[] = {
    REQ(S, role, WK_STR, role),
    REQ(S, content, WK_STR, content),
};
SCHEMA(message_schema, "message", S, message_fields);
#undef S

#define S struct sp_wire_live_request
static const struct wire_field live_fields[] = {
    REQ(S, request_id, WK_U64, request_id),
    SUB(S, model, WK_STRUCT, model, -1, model_ref),
    REQ(S, prompt, WK_PROMPT, prompt),
    SUB(S, sampling, WK_STRUCT, sampling, -1, sampling_schema),
    REQ(S, priority, WK_I32, priority),
    {"messages", WK_STRUCT_ARRAY, 0, offsetof(S, messages), -1, offsetof(S, n_messages),
     &message_schema},
};
SCHEMA(live_schema, "LIVE_REQUEST", S, live_fields);
#undef S

#define S struct sp_wire_tokens
static const struct wire_field tokens_fields[] = {
    REQ(S, request_id, WK_U64, request_id),
    ARR(S, token_ids, WK_TOKEN_ARRAY, WF_REQUIRED, token_ids, n_token_ids),
    ARR(S, text, WK_TEXT, WF_REQUIRED, text, text_len),
    {"finish_reason", WK_STR, WF_NIL, offsetof(S, finish_reason), -1, -1, NULL},
    ARR(S, logprobs, WK_F32_ARRAY, 0, logprobs, n_logprobs),
};
SCHEMA(tokens_schema, "TOKENS", S, tokens_fields);
#undef S

#define S struct sp_wire_cancel
static const struct wire_field cancel_fields[] = {
    REQ(S, request_id, WK_U64, request_id),
};
SCHEMA(cancel_schema, "CANCEL", S, cancel_fields);
#undef S

#define S struct sp_wire_usage
static const struct wire_field usage_fields[] = {
    OPT(S, request_id, WK_U64, request_id),   OPT(S, shard_id, WK_U64, shard_id),
    REQ(S, tokens_in, WK_U64, tokens_in),     REQ(S, tokens_out, WK_U64, tokens_out),
    REQ(S, gpu_seconds, WK_F64, gpu_seconds),
};
SCHEMA(usage_schema, "USAGE", S, usage_fields);
#undef S

#define S struct sp_wire_error
static const struct wire_field error_fields[] = {
    REQ(S, code, WK_STR, code),
    REQ(S, message, WK_STR, message),
    OPT(S, request_id, WK_U64, request_id),
};
SCHEMA(error_schema, "ERROR", S, error_fields);
#undef S

#define S struct sp_wire_revoke
static const struct wire_field revoke_fields[] = {
    REQ(S, shard_id, WK_U64, shard_id),
    REQ(S, lease_token, WK_U64, lease_token),
    REQ(S, reason, WK_STR, reason),
};
SCHEMA(revoke_schema, "REVOKE", S, revoke_fields);
#undef S

const struct wire_schema *sp__wire_body_schema(int type)
{
    switch (type) {
    case SP_WIRE_REGISTER:
        return &register_schema;
    case SP_WIRE_REGISTERED:
        return &registered_schema;
    case SP_WIRE_HEARTBEAT:
        return &heartbeat_schema;
    case SP_WIRE_ASSIGN:
        return &assign_schema;
    case SP_WIRE_PROGRESS:
        return &progress_schema;
    case SP_WIRE_DONE:
        return &done_schema;
    case SP_WIRE_RELEASE:
        return &release_schema;
    case SP_WIRE_DRAIN:
        return &drain_schema;
    case SP_WIRE_GOODBYE:
        return &goodbye_schema;
    case SP_WIRE_LIVE_REQUEST:
        return &live_schema;
    case SP_WIRE_TOKENS:
        return &tokens_schema;
    case SP_WIRE_CANCEL:
        return &cancel_schema;
    case SP_WIRE_USAGE:
        return &usage_schema;
    case SP_WIRE_ERROR:
        return &error_schema;
    case SP_WIRE_REVOKE:
        return &revoke_schema;
    default:
        return NULL;
    }
}
