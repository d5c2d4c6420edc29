/*
 * API key checks for the HTTP front (auth.h): "Bearer <key>", the key's hex
 * SHA-256 looked up in spool.api_keys on the work connection, the answer
 * cached for AUTH_TTL_MS (keys found and keys not found alike), and dropped
 * at once when NOTIFY spool_api_keys names the key (a revocation) or when
 * the work connection comes back (NOTIFYs may have been missed).
 *
 * The cache is a fixed array of AUTH_SLOTS entries indexed by the hash's
 * first bytes; a collision replaces the older entry, which costs only a
 * query. Rate limits and the live-request log are in their own files.
 */
#include "auth.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "scheduler.h"
#include "spool/error.h"
#include "spool/log.h"

#define AUTH_SLOTS  1024
#define AUTH_TTL_MS 10000

struct auth_entry {
    char hash[65]; /* "" when the slot is empty */
    bool found;    /* an active key; else unknown or revoked */
    bool revoked;
    struct sched_principal p;
    uint64_t expires; /* uv_now() ms */
};

struct sched_auth {
    struct auth_entry slots[AUTH_SLOTS];
    uint64_t gen; /* bumped by each forget: a lookup sent before it is not cached */
};

int sched_auth_init(struct sched *s)
{
    s->auth = calloc(1, sizeof *s->auth);
    return s->auth ? 0 : SP_ENOMEM;
}

void sched_auth_stop(struct sched *s)
{
    free(s->auth);
    s->auth = NULL;
}

static struct auth_entry *slot_for(struct sched *s, const char *hash)
{
    unsigned idx = (unsigned)strtoul((char[]){hash[0], hash[1], hash[2], hash[3], 0}, NULL, 16);
    return &s->auth->slots[idx % AUTH_SLOTS];
}

/* The hex SHA-256 of n bytes of key into hex[65]. Returns 0 or SP_ENOMEM. */
static int sha256_hex(const char *key, size_t n, char hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (!EVP_Digest(key, n, md, &mdlen, EVP_sha256(), NULL) || mdlen != 32)
        return SP_ENOMEM;
    for (unsigned i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    return 0;
}

static void answer(const struct auth_entry *e, sched_auth_cb cb, void *arg)
{
    if (e->found)
        cb(arg, &e->p, 200, NULL);
    else if (e->revoked)
        cb(arg, NULL, 401,
           "this API key has been revoked; create a new one with 'spool keys create'");
    else
        cb(arg, NULL, 401, "invalid API key: no such key (check the Authorization header)");
}

struct lookup {
    struct sched *s;
    char hash[65];
    uint64_t gen;
    sched_auth_cb cb;
    void *arg;
};

static void on_lookup(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    struct lookup *l = arg;
    struct sched *s = l->s;
    if (err || !s->auth) {
        sp_warn("http: checking an API key: %s", err ? err : "shutting down");
        l->cb(l->arg, NULL, 503, "the API key cannot be checked now (database unavailable); retry");
        free(l);
        return;
    }
    struct auth_entry e = {.expires = uv_now(s->loop) + AUTH_TTL_MS};
    snprintf(e.hash, sizeof e.hash, "%s", l->hash);
    if (PQntuples(res) == 1) {
        e.revoked = strcmp(PQgetvalue(res, 0, 6), "t") == 0;
        e.found = !e.revoked;
        e.p.key_id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        snprintf(e.p.tenant, sizeof e.p.tenant, "%s", PQgetvalue(res, 0, 1));
        snprintf(e.p.key_prefix, sizeof e.p.key_prefix, "%s", PQgetvalue(res, 0, 2));
        e.p.scopes = (unsigned)strtoul(PQgetvalue(res, 0, 3), NULL, 10);
        e.p.rpm_limit = (uint32_t)strtoul(PQgetvalue(res, 0, 4), NULL, 10);
        e.p.tpm_limit = (uint32_t)strtoul(PQgetvalue(res, 0, 5), NULL, 10);
    }
    if (l->gen == s->auth->gen)
        *slot_for(s, l->hash) = e;
    answer(&e, l->cb, l->arg);
    free(l);
}

void sched_auth_check(struct sched *s, const char *authorization, sched_auth_cb cb, void *arg)
{
    const char *v = authorization;
    if (!v || !*v) {
        cb(arg, NULL, 401,
           "missing API key: send the header 'Authorization: Bearer <key>' (keys come from "
           "'spool keys create')");
        return;
    }
    while (*v == ' ')
        v++;
    if (strncasecmp(v, "Bearer ", 7) != 0) {
        cb(arg, NULL, 401, "malformed Authorization header: expected 'Bearer <key>'");
        return;
    }
    v += 7;
    while (*v == ' ')
        v++;
    size_t n = strlen(v);
    while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
        n--;
    if (n == 0 || n > 256) {
        cb(arg, NULL, 401, "malformed Authorization header: the bearer key is empty or too long");
        return;
    }
    char hash[65];
    if (!s->auth || sha256_hex(v, n, hash) != 0) {
        cb(arg, NULL, 503, "the API key cannot be checked now; retry");
        return;
    }
    struct auth_entry *e = slot_for(s, hash);
    if (strcmp(e->hash, hash) == 0 && e->expires > uv_now(s->loop)) {
        answer(e, cb, arg);
        return;
    }
    struct lookup *l = malloc(sizeof *l);
    if (!l) {
        cb(arg, NULL, 503, "out of memory; retry");
        return;
    }
    *l = (struct lookup){.s = s, .gen = s->auth->gen, .cb = cb, .arg = arg};
    memcpy(l->hash, hash, sizeof hash);
    const char *p[] = {hash};
    if (sp_pgconn_query(s->db,
                        "SELECT id, tenant, prefix, "
                        "('inference' = ANY(scopes))::int + 2 * ('batch' = ANY(scopes))::int "
                        "+ 4 * ('admin' = ANY(scopes))::int, "
                        "coalesce(rpm_limit, 0), coalesce(tpm_limit, 0), revoked_at IS NOT NULL "
                        "FROM spool.api_keys WHERE key_hash = $1",
                        1, p, on_lookup, l) != 0) {
        free(l);
        cb(arg, NULL, 503, "the API key cannot be checked now (database unavailable); retry");
    }
}

void sched_auth_forget(struct sched *s, const char *payload)
{
    if (!s->auth)
        return;
    /* An empty payload (the work connection came back) forgets every key. */
    int64_t id = payload && *payload ? strtoll(payload, NULL, 10) : -1;
    s->auth->gen++;
    for (size_t i = 0; i < AUTH_SLOTS; i++) {
        struct auth_entry *e = &s->auth->slots[i];
        if (e->hash[0] && (id < 0 || e->p.key_id == id || !e->found))
            e->hash[0] = '\0';
    }
    sp_debug("http: forgot API key %s", id < 0 ? "(all)" : payload);
}
