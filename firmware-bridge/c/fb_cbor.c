/* fb_cbor.c: a small CBOR writer and pull reader, no allocation. */
#include <string.h>

#include "fb_cbor.h"

void fb_cbor_writer_init(fb_cbor_writer_t *w, uint8_t *buf, size_t cap) {
    w->buf = buf;
    w->cap = cap;
    w->n = 0;
    w->err = 0;
}

static void put(fb_cbor_writer_t *w, const uint8_t *b, size_t n) {
    if (w->err || n > w->cap - w->n) {
        w->err = 1;
        return;
    }
    memcpy(w->buf + w->n, b, n);
    w->n += n;
}

static void head(fb_cbor_writer_t *w, int major, uint64_t v) {
    uint8_t b[9];
    size_t n;
    uint8_t m = (uint8_t)(major << 5);
    if (v < 24) {
        b[0] = (uint8_t)(m | v);
        n = 1;
    } else if (v <= 0xff) {
        b[0] = m | 24;
        b[1] = (uint8_t)v;
        n = 2;
    } else if (v <= 0xffff) {
        b[0] = m | 25;
        b[1] = (uint8_t)(v >> 8);
        b[2] = (uint8_t)v;
        n = 3;
    } else if (v <= 0xffffffffu) {
        b[0] = m | 26;
        for (int i = 0; i < 4; i++) b[1 + i] = (uint8_t)(v >> (24 - 8 * i));
        n = 5;
    } else {
        b[0] = m | 27;
        for (int i = 0; i < 8; i++) b[1 + i] = (uint8_t)(v >> (56 - 8 * i));
        n = 9;
    }
    put(w, b, n);
}

void fb_cbor_put_uint(fb_cbor_writer_t *w, uint64_t v) { head(w, 0, v); }
void fb_cbor_put_int(fb_cbor_writer_t *w, int64_t v) {
    if (v >= 0) head(w, 0, (uint64_t)v);
    else head(w, 1, (uint64_t)(-1 - v));
}
void fb_cbor_put_bytes(fb_cbor_writer_t *w, const uint8_t *b, size_t n) {
    head(w, 2, n);
    put(w, b, n);
}
void fb_cbor_put_text(fb_cbor_writer_t *w, const char *s) {
    size_t n = strlen(s);
    head(w, 3, n);
    put(w, (const uint8_t *)s, n);
}
void fb_cbor_put_f32(fb_cbor_writer_t *w, float v) {
    uint32_t bits;
    uint8_t b[5];
    memcpy(&bits, &v, 4);
    b[0] = 0xfa;
    for (int i = 0; i < 4; i++) b[1 + i] = (uint8_t)(bits >> (24 - 8 * i));
    put(w, b, 5);
}
void fb_cbor_put_map(fb_cbor_writer_t *w, size_t pairs) { head(w, 5, pairs); }
void fb_cbor_put_array(fb_cbor_writer_t *w, size_t items) { head(w, 4, items); }
void fb_cbor_put_tag(fb_cbor_writer_t *w, uint64_t tag) { head(w, 6, tag); }
void fb_cbor_put_int16_array(fb_cbor_writer_t *w, const int16_t *v, size_t n) {
    head(w, 6, 77);
    head(w, 2, n * 2);
    if (w->err || n * 2 > w->cap - w->n) {
        w->err = 1;
        return;
    }
    for (size_t i = 0; i < n; i++) {
        uint16_t u = (uint16_t)v[i];
        w->buf[w->n++] = (uint8_t)u;
        w->buf[w->n++] = (uint8_t)(u >> 8);
    }
}

void fb_cbor_reader_init(fb_cbor_reader_t *r, const uint8_t *buf, size_t n) {
    r->p = buf;
    r->end = buf + n;
    r->err = 0;
}

int fb_cbor_head(fb_cbor_reader_t *r, int *major, uint64_t *arg, int *info) {
    if (r->err || r->p >= r->end) {
        r->err = 1;
        return -1;
    }
    uint8_t ib = *r->p++;
    int ai = ib & 0x1f;
    size_t len = ai < 24 ? 0 : ai == 24 ? 1 : ai == 25 ? 2 : ai == 26 ? 4 : ai == 27 ? 8 : 99;
    *major = ib >> 5;
    *info = ai;
    if (len == 99 || (size_t)(r->end - r->p) < len) {
        r->err = 1;
        return -1;
    }
    uint64_t v = ai < 24 ? (uint64_t)ai : 0;
    for (size_t i = 0; i < len; i++) v = (v << 8) | *r->p++;
    *arg = v;
    return 0;
}

static void skip_depth(fb_cbor_reader_t *r, int depth) {
    int major, info;
    uint64_t arg;
    if (depth > 8) {
        r->err = 1;
        return;
    }
    if (fb_cbor_head(r, &major, &arg, &info)) return;
    switch (major) {
    case FB_CBOR_BYTES:
    case FB_CBOR_TEXT:
        if ((uint64_t)(r->end - r->p) < arg) r->err = 1;
        else r->p += arg;
        break;
    case FB_CBOR_ARRAY:
        for (uint64_t i = 0; i < arg && !r->err; i++) skip_depth(r, depth + 1);
        break;
    case FB_CBOR_MAP:
        for (uint64_t i = 0; i < arg * 2 && !r->err; i++) skip_depth(r, depth + 1);
        break;
    case FB_CBOR_TAG:
        skip_depth(r, depth + 1);
        break;
    default:
        break;
    }
}

void fb_cbor_skip(fb_cbor_reader_t *r) { skip_depth(r, 0); }

int fb_cbor_get_uint(fb_cbor_reader_t *r, uint64_t *v) {
    int major, info;
    if (fb_cbor_head(r, &major, v, &info) || major != FB_CBOR_UINT) {
        r->err = 1;
        return -1;
    }
    return 0;
}

static float half_to_float(uint16_t h) {
    int e = (h >> 10) & 0x1f;
    int f = h & 0x3ff;
    float v;
    if (e == 0) v = (float)f / 16777216.0f;
    else if (e == 31) v = f ? 0.0f / 0.0f : 1.0f / 0.0f;
    else {
        v = 1.0f + (float)f / 1024.0f;
        for (; e > 15; e--) v *= 2.0f;
        for (; e < 15; e++) v /= 2.0f;
    }
    return (h & 0x8000) ? -v : v;
}

int fb_cbor_get_float(fb_cbor_reader_t *r, float *v) {
    int major, info;
    uint64_t arg;
    if (fb_cbor_head(r, &major, &arg, &info)) return -1;
    if (major == FB_CBOR_UINT) *v = (float)arg;
    else if (major == FB_CBOR_NEGINT) *v = -1.0f - (float)arg;
    else if (major == FB_CBOR_SIMPLE && info == 25) *v = half_to_float((uint16_t)arg);
    else if (major == FB_CBOR_SIMPLE && info == 26) {
        uint32_t bits = (uint32_t)arg;
        memcpy(v, &bits, 4);
    } else if (major == FB_CBOR_SIMPLE && info == 27) {
        double d;
        memcpy(&d, &arg, 8);
        *v = (float)d;
    } else {
        r->err = 1;
        return -1;
    }
    return 0;
}

int fb_cbor_get_string(fb_cbor_reader_t *r, int want_major, const uint8_t **ptr, size_t *n) {
    int major, info;
    uint64_t arg;
    if (fb_cbor_head(r, &major, &arg, &info) || major != want_major || (uint64_t)(r->end - r->p) < arg) {
        r->err = 1;
        return -1;
    }
    *ptr = r->p;
    *n = (size_t)arg;
    r->p += arg;
    return 0;
}
