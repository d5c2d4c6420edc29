/*
 * A fixed thread pool for the CPU backend: n - 1 worker threads created once,
 * plus the calling thread. se__pool_run runs fn(arg, i, n) for i in [0, n) on
 * all n threads at once and returns when every call has returned; it never
 * allocates. One se__pool_run at a time per pool (the backend is used from one
 * thread).
 */
#ifndef SPOOL_ENGINE_CPU_POOL_H
#define SPOOL_ENGINE_CPU_POOL_H

struct se_pool;
typedef void (*se_pool_fn)(void *arg, int i, int n);

/* Returns NULL when out of memory or when threads cannot be created. */
struct se_pool *se__pool_new(int n_threads);
int se__pool_size(const struct se_pool *p);
void se__pool_run(struct se_pool *p, se_pool_fn fn, void *arg);
void se__pool_free(struct se_pool *p);

#endif
