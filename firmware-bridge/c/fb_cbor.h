/* fb_cbor.h: the CBOR subset of frame bodies (definite lengths, integer map keys, RFC 8746 typed arrays). */
#ifndef FB_CBOR_H
#define FB_CBOR_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint8_t *buf;
    size_t cap;
    size_t n;
    int err; /* set when the buffer is too small; every later write is ignored */
} fb_cbor_writer_t;

void fb_cbor_writer_init(fb_cbor_writer_t *w, uint8_t *buf, size_t cap);
void fb_cbor_put_uint(fb_cbor_writer_t *w, uint64_t v);
void fb_cbor_put_int(fb_cbor_writer_t *w, int64_t v);
void fb_cbor_put_bytes(fb_cbor_writer_t *w, const uint8_t *b, size_t n);
void fb_cbor_put_text(fb_cbor_writer_t *w, const char *s);
void fb_cbor_put_f32(fb_cbor_writer_t *w, float v);
void fb_cbor_put_map(fb_cbor_writer_t *w, size_t pairs);
void fb_cbor_put_array(fb_cbor_writer_t *w, size_t items);
void fb_cbor_put_tag(fb_cbor_writer_t *w, uint64_t tag);
/* A tag-77 typed array (int16 little-endian) of n samples. */
void fb_cbor_put_int16_array(fb_cbor_writer_t *w, const int16_t *v, size_t n);

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
    int err;
} fb_cbor_reader_t;

enum { FB_CBOR_UINT = 0, FB_CBOR_NEGINT, FB_CBOR_BYTES, FB_CBOR_TEXT, FB_CBOR_ARRAY, FB_CBOR_MAP, FB_CBOR_TAG, FB_CBOR_SIMPLE };

void fb_cbor_reader_init(fb_cbor_reader_t *r, const uint8_t *buf, size_t n);
/* Reads one head: its major type and argument (for floats, the raw bits; info in *info). */
int fb_cbor_head(fb_cbor_reader_t *r, int *major, uint64_t *arg, int *info);
/* Skips one item (nesting limited to 8 levels). */
void fb_cbor_skip(fb_cbor_reader_t *r);
int fb_cbor_get_uint(fb_cbor_reader_t *r, uint64_t *v);
/* A number: unsigned or negative integer, half, single or double float. */
int fb_cbor_get_float(fb_cbor_reader_t *r, float *v);
/* A byte or text string: *ptr points into the buffer. want_major is FB_CBOR_BYTES or FB_CBOR_TEXT. */
int fb_cbor_get_string(fb_cbor_reader_t *r, int want_major, const uint8_t **ptr, size_t *n);

#endif
