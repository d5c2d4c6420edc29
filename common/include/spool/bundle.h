/*
 * Model bundles and the model store.
 *
 * A bundle is a model directory packed as a tar archive compressed with zstd
 * (through libarchive), addressed by the sha256 of the bundle's bytes. Packing
 * is deterministic: entries sorted by name, owner 0, mode 0644, mtime 0, so
 * the same directory always gives the same digest.
 *
 * The store keeps bundles by digest behind a small interface (struct
 * sp_store_i) so that an object store can follow; the one implementation
 * today is a directory (SPOOL_MODEL_STORE), with URIs "file:///ROOT/sha256/HEX.tar.zst".
 *
 * Workers fetch a bundle, verify its digest and unpack it into a local cache
 * with a size limit (least recently used entries are evicted); a bundle whose
 * bytes do not match its digest is refused.
 */
#ifndef SPOOL_BUNDLE_H
#define SPOOL_BUNDLE_H

#include <stddef.h>
#include <stdint.h>

/*
 * Packs the regular files of model_dir (not recursing into subdirectories;
 * hidden files skipped) into out_path. Returns 0 with the digest in hex and the
 * bundle's size in *size, or a negative SP_E* code with err set.
 */
int sp_bundle_pack(const char *model_dir, const char *out_path, char hex[65], uint64_t *size,
                   char *err, size_t errcap);

/* Computes the sha256 of a file's bytes. */
int sp_file_sha256(const char *path, char hex[65], uint64_t *size, char *err, size_t errcap);

/*
 * Verifies that bundle_path hashes to digest, then unpacks it into dest_dir
 * (which must not exist; it is created atomically through a temporary
 * directory and a rename). Refuses entries with absolute paths, "..", links
 * or non-regular files. Returns 0, SP_ECHECKSUM (err names both digests),
 * SP_ECORRUPT for a damaged archive, or another SP_E* code.
 */
int sp_bundle_unpack(const char *bundle_path, const char *digest, const char *dest_dir, char *err,
                     size_t errcap);

/* A model store: bundles addressed by digest. */
struct sp_store_i {
    /* Stores the bundle at local_path under digest; writes its URI into uri. */
    int (*put)(void *ctx, const char *local_path, const char *digest, char *uri, size_t uricap,
               char *err, size_t errcap);
    /* Copies the bundle at uri to dest_path. */
    int (*get)(void *ctx, const char *uri, const char *dest_path, char *err, size_t errcap);
    void (*free)(void *ctx);
};

struct sp_store {
    const struct sp_store_i *i;
    void *ctx;
};

/*
 * Opens the store named by location: a directory path or a file:// URI
 * (created if missing). NULL location means $SPOOL_MODEL_STORE, else
 * $SPOOL_HOME/models, else ./.spool/models.
 */
int sp_store_open(const char *location, struct sp_store *out, char *err, size_t errcap);
void sp_store_close(struct sp_store *s);

/*
 * Makes the model with this digest available unpacked under cache_dir and
 * writes its directory into out_dir: reuses a complete cached copy, else
 * fetches uri from the store into the cache, verifies and unpacks it. Then
 * evicts least recently used other entries until the cache holds at most
 * limit_bytes (0 = no limit; the entry just fetched is never evicted).
 */
int sp_model_cache_fetch(struct sp_store *store, const char *uri, const char *digest,
                         const char *cache_dir, uint64_t limit_bytes, char *out_dir,
                         size_t outcap, char *err, size_t errcap);

#endif
