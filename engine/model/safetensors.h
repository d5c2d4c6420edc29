/*
 * safetensors files: an 8-byte little-endian header length, a JSON header
 * mapping tensor names to {dtype, shape, data_offsets}, then the data. Offsets
 * are relative to the first byte after the header.
 *
 * Internal to the engine. The parser works on a byte buffer (the whole file,
 * usually an mmap) so that the fuzz driver can call it on any input.
 */
#ifndef SPOOL_ENGINE_SAFETENSORS_H
#define SPOOL_ENGINE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "../backend.h"

/* Largest header accepted (the format's own limit is 100 MB). */
#define SE_ST_MAX_HEADER (100u << 20)

/*
 * Parses the header of the file held in buf (size bytes, the whole file) and
 * fills *tensors with *n tensors, in no particular order, whose data points
 * into buf. Every tensor's dtype must be F32, F16 or BF16, its byte range must
 * equal shape x element size, lie inside the data section and overlap no
 * other tensor; "__metadata__" is ignored. On success *tensors is malloc'd,
 * each name is malloc'd too; free with se__st_free_tensors. Returns 0 or
 * SP_ECORRUPT / SP_EUNSUPPORTED / SP_ENOMEM with err saying what and which
 * tensor (the caller prefixes the file name).
 */
int se__st_parse(const uint8_t *buf, size_t size, struct se_tensor **tensors, int *n, char *err,
                 size_t errcap);
void se__st_free_tensors(struct se_tensor *tensors, int n);

/* A mapped safetensors file. */
struct se_st_file {
    char *path;
    void *map;
    size_t size;
    struct se_tensor *tensors;
    int n_tensors;
};

/*
 * Maps path read-only and parses it. Returns 0 or SP_ENOENT / SP_EIO /
 * SP_ECORRUPT / SP_EUNSUPPORTED with err naming the file. Close with
 * se__st_close (safe on a zeroed struct).
 */
int se__st_open(const char *path, struct se_st_file *f, char *err, size_t errcap);
void se__st_close(struct se_st_file *f);

/* Bytes per element of t. */
size_t se__dtype_size(enum se_dtype t);

#endif
