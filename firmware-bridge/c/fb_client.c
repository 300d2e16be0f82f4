/* fb_client.c: frames, retransmits and the request/reply state machine. */
#include <string.h>

#include "fb.h"
#include "fb_cbor.h"

#define KEY_PENDING 20

static void put_u16(uint8_t *b, uint16_t v) {
    b[0] = (uint8_t)v;
    b[1] = (uint8_t)(v >> 8);
}
static void put_u32(uint8_t *b, uint32_t v) {
    for (int i = 0; i < 4; i++) b[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get_u32(const uint8_t *b) {
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static void make_nonce(uint8_t nonce[12], const uint8_t *header, uint8_t direction) {
    memcpy(nonce, header + 1, 10); /* device id, epoch, seq: already little-endian in the header */
    nonce[10] = direction;
    nonce[11] = 0;
}

size_t fb_seal_packet(const fb_crypto_t *crypto, const uint8_t key[32], uint8_t type, uint32_t device_id,
                      uint16_t epoch, uint32_t seq, uint8_t direction, const uint8_t *body, size_t n,
                      uint8_t *out, size_t cap) {
    uint8_t nonce[12];
    if (cap < FB_HEADER_BYTES + n + FB_TAG_BYTES) return 0;
    out[0] = (uint8_t)((1u << 5) | (type & 0x1f));
    put_u32(out + 1, device_id);
    put_u16(out + 5, epoch);
    put_u32(out + 7, seq);
    make_nonce(nonce, out, direction);
    if (crypto->seal(out + FB_HEADER_BYTES, body, n, out, FB_HEADER_BYTES, nonce, key) != 0) return 0;
    return FB_HEADER_BYTES + n + FB_TAG_BYTES;
}

int fb_open_packet(const fb_crypto_t *crypto, const uint8_t key[32], const uint8_t *packet, size_t n,
                   uint8_t direction, uint8_t *body, size_t cap) {
    uint8_t nonce[12];
    if (n < FB_HEADER_BYTES + FB_TAG_BYTES || (packet[0] >> 5) != 1) return -1;
    if (n - FB_HEADER_BYTES - FB_TAG_BYTES > cap) return -1;
    make_nonce(nonce, packet, direction);
    if (crypto->open(body, packet + FB_HEADER_BYTES, n - FB_HEADER_BYTES, packet, FB_HEADER_BYTES, nonce, key) != 0) return -1;
    return (int)(n - FB_HEADER_BYTES - FB_TAG_BYTES);
}

int fb_new_epoch(fb_client_t *c) {
    uint16_t next = (uint16_t)(c->epoch + 1);
    if (next == 0) next = 1; /* wrapped: a real device needs a new key before this happens */
    if (c->cfg.port->store_epoch(c->cfg.port->ctx, next) != 0) return FB_ERR_PORT;
    c->epoch = next;
    c->seq = 0;
    return FB_OK;
}

/* Silent exchanges before the sequence skips ahead, before the first new epoch, and the most between new epochs. */
#define FB_SKIP_AT 3
#define FB_FIRST_EPOCH_GAP 3
#define FB_MAX_EPOCH_GAP 1024
/* How far the sequence skips: past any floor the bridge wrote ahead of use (64) and kept over its restart. */
#define FB_SEQ_SKIP 128

static void heard(fb_client_t *c) {
    c->fails = 0;
    c->bump_at = FB_SKIP_AT + FB_FIRST_EPOCH_GAP;
    c->bump_gap = FB_FIRST_EPOCH_GAP;
}

/*
 * One more exchange without an answer. The bridge drops without a word a frame at or below the floor it keeps for
 * us, as after its own restart: at FB_SKIP_AT in a row the sequence skips ahead of any such floor. A bridge that holds
 * a newer epoch for us (our stored one was lost) needs a new epoch: the first at FB_SKIP_AT + FB_FIRST_EPOCH_GAP, then
 * each after twice as many silent exchanges as the last, at most FB_MAX_EPOCH_GAP. A week without a bridge, exchanges
 * back to back at the default timeouts (3 tries of 1 s), then costs the 16-bit epoch (and the NVM it is stored in)
 * about 200 steps. One every three exchanges would wrap it in about a week and leave the device refused as stale
 * until it is provisioned again.
 */
static void silent(fb_client_t *c) {
    if (c->fails < 0xffffffffu) c->fails++;
    if (c->fails == FB_SKIP_AT) {
        if (c->seq > 0xffffffffu - FB_SEQ_SKIP) fb_new_epoch(c);
        else c->seq += FB_SEQ_SKIP;
    } else if (c->fails >= c->bump_at) {
        fb_new_epoch(c);
        c->bump_gap = c->bump_gap * 2 > FB_MAX_EPOCH_GAP ? FB_MAX_EPOCH_GAP : c->bump_gap * 2;
        c->bump_at = c->fails + c->bump_gap;
    }
}

int fb_init(fb_client_t *c, const fb_config_t *cfg) {
    memset(c, 0, sizeof *c);
    c->cfg = *cfg;
    if (!c->cfg.timeout_ms) c->cfg.timeout_ms = 1000;
    if (!c->cfg.tries) c->cfg.tries = 3;
    if (cfg->port->load_key(cfg->port->ctx, c->key) != 0) return FB_ERR_PORT;
    if (cfg->port->load_epoch(cfg->port->ctx, &c->epoch) != 0) c->epoch = 0;
    heard(c);
    /* The epoch is stored before the first frame, so no (epoch, seq) is ever sent twice. */
    return fb_new_epoch(c);
}

/* Checks one received packet against the request in flight and opens it into c->reply. */
static int take_packet(fb_client_t *c, const uint8_t *p, size_t n) {
    int m;
    if (n < FB_HEADER_BYTES + FB_TAG_BYTES || memcmp(p + 1, c->tx + 1, 10) != 0) return 0;
    m = fb_open_packet(c->cfg.crypto, c->key, p, n, 1, c->reply, sizeof c->reply);
    if (m < 0) return 0;
    c->reply_n = (size_t)m;
    c->reply_type = p[0] & 0x1f;
    return 1;
}

/* Serial: feeds bytes to the deframer; returns 1 once a matching reply was opened. */
static int take_bytes(fb_client_t *c, const uint8_t *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (b[i] != 0) {
            if (c->acc_overflow) continue;
            if (c->acc_n == sizeof c->wire) {
                c->acc_overflow = 1;
                c->acc_n = 0;
                continue;
            }
            c->wire[c->acc_n++] = b[i];
            continue;
        }
        if (c->acc_overflow) {
            c->acc_overflow = 0;
            continue;
        }
        if (c->acc_n == 0) continue;
        /* decode into the tail of rx (rx is not used for serial input otherwise) */
        size_t m = fb_cobs_decode(c->wire, c->acc_n, c->rx, sizeof c->rx);
        c->acc_n = 0;
        if (m < 3) continue;
        uint16_t crc = (uint16_t)(c->rx[m - 2] | c->rx[m - 1] << 8);
        if (fb_crc16(c->rx, m - 2) != crc) continue;
        if (take_packet(c, c->rx, m - 2)) return 1;
    }
    return 0;
}

static int transmit(fb_client_t *c) {
    const fb_port_t *port = c->cfg.port;
    if (c->cfg.link == FB_LINK_SERIAL) {
        /* rx is free while sending: it only holds decoded input frames */
        size_t n = fb_serial_encode(c->tx, c->tx_n, c->rx, sizeof c->rx);
        if (n == 0) return FB_ERR_TOO_LARGE;
        return port->send(port->ctx, c->rx, n) == 0 ? FB_OK : FB_ERR_PORT;
    }
    return port->send(port->ctx, c->tx, c->tx_n) == 0 ? FB_OK : FB_ERR_PORT;
}

/* Sends c->tx (already sealed) and waits for its reply, resending the same bytes on each timeout. */
static int exchange(fb_client_t *c) {
    const fb_port_t *port = c->cfg.port;
    for (uint8_t attempt = 0; attempt < c->cfg.tries; attempt++) {
        int rc = transmit(c);
        if (rc) return rc;
        uint32_t start = port->now_ms(port->ctx);
        for (;;) {
            uint32_t spent = port->now_ms(port->ctx) - start;
            if (spent >= c->cfg.timeout_ms) break;
            int n = port->recv(port->ctx, c->cfg.link == FB_LINK_SERIAL ? c->body : c->rx,
                               c->cfg.link == FB_LINK_SERIAL ? sizeof c->body : sizeof c->rx, c->cfg.timeout_ms - spent);
            if (n < 0) return FB_ERR_PORT;
            if (n == 0) continue;
            int got = c->cfg.link == FB_LINK_SERIAL ? take_bytes(c, c->body, (size_t)n) : take_packet(c, c->rx, (size_t)n);
            if (got) {
                heard(c);
                return FB_OK;
            }
        }
    }
    silent(c);
    return FB_ERR_TIMEOUT;
}

/* Seals c->body[0..n) as the next uplink and runs the exchange. */
static int request(fb_client_t *c, uint8_t type, size_t n) {
    if (c->seq == 0xffffffffu && fb_new_epoch(c) != FB_OK) return FB_ERR_PORT;
    c->seq++;
    c->tx_n = fb_seal_packet(c->cfg.crypto, c->key, type, c->cfg.device_id, c->epoch, c->seq, 0, c->body, n, c->tx, sizeof c->tx - 2);
    if (c->tx_n == 0) return FB_ERR_TOO_LARGE;
    return exchange(c);
}

/* Reads the reply map's key 20 (pending downlinks) and, for ERROR, key 1 (the code). */
static int common_reply(fb_client_t *c, uint8_t expected_type) {
    fb_cbor_reader_t r;
    int major, info;
    uint64_t pairs, key, v;
    c->pending = 0;
    fb_cbor_reader_init(&r, c->reply, c->reply_n);
    if (c->reply_n == 0) return c->reply_type == expected_type ? FB_OK : FB_ERR_PROTO;
    if (fb_cbor_head(&r, &major, &pairs, &info) || major != FB_CBOR_MAP) return FB_ERR_PROTO;
    for (uint64_t i = 0; i < pairs && !r.err; i++) {
        if (fb_cbor_get_uint(&r, &key)) break;
        if (key == KEY_PENDING || (c->reply_type == FB_ERROR && key == 1)) {
            if (fb_cbor_get_uint(&r, &v)) break;
            if (key == KEY_PENDING) c->pending = (uint8_t)(v > 255 ? 255 : v);
            else c->last_error = (int)v;
        } else fb_cbor_skip(&r);
    }
    if (r.err) return FB_ERR_PROTO;
    if (c->reply_type == FB_ERROR) return FB_ERR_REMOTE;
    return c->reply_type == expected_type ? FB_OK : FB_ERR_PROTO;
}

int fb_hello(fb_client_t *c, uint32_t sleep_period_s, uint32_t keepalive_s) {
    fb_cbor_writer_t w;
    fb_cbor_reader_t r;
    int major, info, rc;
    uint64_t pairs, key, items, v;
    fb_cbor_writer_init(&w, c->body, sizeof c->body);
    fb_cbor_put_map(&w, 4);
    fb_cbor_put_uint(&w, 1);
    fb_cbor_put_text(&w, "fb-c 1.0");
    fb_cbor_put_uint(&w, 2);
    fb_cbor_put_uint(&w, FB_MAX_PACKET);
    fb_cbor_put_uint(&w, 3);
    fb_cbor_put_uint(&w, sleep_period_s);
    fb_cbor_put_uint(&w, 4);
    fb_cbor_put_uint(&w, keepalive_s);
    if ((rc = request(c, FB_HELLO, w.n)) != FB_OK) return rc;
    if ((rc = common_reply(c, FB_WELCOME)) != FB_OK) return rc;
    c->n_models = 0;
    fb_cbor_reader_init(&r, c->reply, c->reply_n);
    fb_cbor_head(&r, &major, &pairs, &info);
    for (uint64_t i = 0; i < pairs && !r.err; i++) {
        if (fb_cbor_get_uint(&r, &key)) break;
        if (key != 1) {
            fb_cbor_skip(&r);
            continue;
        }
        if (fb_cbor_head(&r, &major, &items, &info) || major != FB_CBOR_ARRAY) return FB_ERR_PROTO;
        for (uint64_t k = 0; k < items && !r.err; k++) {
            const uint8_t *name;
            size_t len;
            uint64_t two;
            if (fb_cbor_head(&r, &major, &two, &info) || major != FB_CBOR_ARRAY || two != 2) return FB_ERR_PROTO;
            if (fb_cbor_get_uint(&r, &v) || fb_cbor_get_string(&r, FB_CBOR_TEXT, &name, &len)) return FB_ERR_PROTO;
            if (c->n_models < FB_MAX_MODELS && len < FB_MODEL_NAME) {
                c->models[c->n_models].id = (uint16_t)v;
                memcpy(c->models[c->n_models].name, name, len);
                c->models[c->n_models].name[len] = 0;
                c->n_models++;
            }
        }
    }
    return r.err ? FB_ERR_PROTO : FB_OK;
}

uint16_t fb_model_id(const fb_client_t *c, const char *name) {
    for (uint8_t i = 0; i < c->n_models; i++)
        if (strcmp(c->models[i].name, name) == 0) return c->models[i].id;
    return 0;
}

static int read_infer_reply(fb_client_t *c, fb_result_t *res) {
    fb_cbor_reader_t r;
    int major, info, rc;
    uint64_t pairs, key, v;
    if ((rc = common_reply(c, FB_INFER_RESP)) != FB_OK) return rc;
    res->output_n = 0;
    res->agent[0] = 0;
    fb_cbor_reader_init(&r, c->reply, c->reply_n);
    fb_cbor_head(&r, &major, &pairs, &info);
    for (uint64_t i = 0; i < pairs && !r.err; i++) {
        const uint8_t *p;
        size_t len;
        if (fb_cbor_get_uint(&r, &key)) break;
        switch (key) {
        case 1:
            fb_cbor_get_uint(&r, &v);
            res->label = (uint32_t)v;
            break;
        case 2:
            fb_cbor_get_float(&r, &res->score);
            break;
        case 3:
            fb_cbor_get_uint(&r, &v);
            res->latency_ms = (uint32_t)v;
            break;
        case 4:
            if (fb_cbor_get_string(&r, FB_CBOR_TEXT, &p, &len) == 0) {
                if (len >= sizeof res->agent) len = sizeof res->agent - 1;
                memcpy(res->agent, p, len);
                res->agent[len] = 0;
            }
            break;
        case 5:
            if (fb_cbor_get_string(&r, FB_CBOR_BYTES, &p, &len) == 0 && len == 8) memcpy(res->receipt_ref, p, 8);
            break;
        case 6: /* tag 85: float32 little-endian */
            if (fb_cbor_head(&r, &major, &v, &info) || major != FB_CBOR_TAG || v != 85) return FB_ERR_PROTO;
            if (fb_cbor_get_string(&r, FB_CBOR_BYTES, &p, &len) || len % 4) return FB_ERR_PROTO;
            for (size_t k = 0; k < len / 4 && res->output && k < res->output_cap; k++) {
                uint32_t bits = get_u32(p + 4 * k);
                memcpy(&res->output[k], &bits, 4);
                res->output_n = k + 1;
            }
            break;
        default:
            fb_cbor_skip(&r);
        }
    }
    return r.err ? FB_ERR_PROTO : FB_OK;
}

int fb_infer(fb_client_t *c, uint16_t model_id, const int16_t *samples, size_t n, float scale,
             const uint32_t *shape, uint8_t rank, uint32_t deadline_ms, int want_raw, fb_result_t *res) {
    fb_cbor_writer_t w;
    int rc;
    if (!model_id || !res) return FB_ERR_ARG;
    fb_cbor_writer_init(&w, c->body, sizeof c->body - FB_HEADER_BYTES - FB_TAG_BYTES);
    fb_cbor_put_map(&w, shape && rank ? 6 : 5);
    fb_cbor_put_uint(&w, 1);
    fb_cbor_put_uint(&w, model_id);
    fb_cbor_put_uint(&w, 2);
    fb_cbor_put_int16_array(&w, samples, n);
    fb_cbor_put_uint(&w, 3);
    fb_cbor_put_f32(&w, scale);
    if (shape && rank) {
        fb_cbor_put_uint(&w, 5);
        fb_cbor_put_array(&w, rank);
        for (uint8_t i = 0; i < rank; i++) fb_cbor_put_uint(&w, shape[i]);
    }
    fb_cbor_put_uint(&w, 6);
    fb_cbor_put_uint(&w, deadline_ms);
    fb_cbor_put_uint(&w, 7);
    fb_cbor_put_uint(&w, want_raw ? 1 : 0);
    if (w.err) return FB_ERR_TOO_LARGE;
    if ((rc = request(c, FB_INFER_REQ, w.n)) != FB_OK) return rc;
    return read_infer_reply(c, res);
}

int fb_infer_retransmit(fb_client_t *c, fb_result_t *res) {
    int rc;
    if (c->tx_n == 0) return FB_ERR_ARG;
    if ((rc = exchange(c)) != FB_OK) return rc;
    return read_infer_reply(c, res);
}

int fb_telemetry(fb_client_t *c, const uint16_t *index, const float *value, size_t n) {
    fb_cbor_writer_t w;
    int rc;
    fb_cbor_writer_init(&w, c->body, sizeof c->body - FB_HEADER_BYTES - FB_TAG_BYTES);
    fb_cbor_put_map(&w, 1);
    fb_cbor_put_uint(&w, 1);
    fb_cbor_put_array(&w, n);
    for (size_t i = 0; i < n; i++) {
        fb_cbor_put_array(&w, 2);
        fb_cbor_put_uint(&w, index[i]);
        fb_cbor_put_f32(&w, value[i]);
    }
    if (w.err) return FB_ERR_TOO_LARGE;
    if ((rc = request(c, FB_TELEMETRY, w.n)) != FB_OK) return rc;
    return common_reply(c, FB_ACK);
}

int fb_sleep(fb_client_t *c, uint32_t seconds) {
    fb_cbor_writer_t w;
    int rc;
    fb_cbor_writer_init(&w, c->body, sizeof c->body);
    fb_cbor_put_map(&w, 1);
    fb_cbor_put_uint(&w, 1);
    fb_cbor_put_uint(&w, seconds);
    if ((rc = request(c, FB_SLEEP, w.n)) != FB_OK) return rc;
    return common_reply(c, FB_ACK);
}

int fb_poll(fb_client_t *c, uint8_t *payload, size_t cap, size_t *len) {
    fb_cbor_reader_t r;
    int major, info, rc;
    uint64_t pairs, key;
    c->body[0] = 0xa0; /* {} */
    *len = 0;
    if ((rc = request(c, FB_POLL, 1)) != FB_OK) return rc;
    if (c->reply_type == FB_ACK) return common_reply(c, FB_ACK);
    if ((rc = common_reply(c, FB_DOWNLINK)) != FB_OK) return rc;
    fb_cbor_reader_init(&r, c->reply, c->reply_n);
    fb_cbor_head(&r, &major, &pairs, &info);
    for (uint64_t i = 0; i < pairs && !r.err; i++) {
        const uint8_t *p;
        size_t n;
        if (fb_cbor_get_uint(&r, &key)) break;
        if (key == 2 && fb_cbor_get_string(&r, FB_CBOR_BYTES, &p, &n) == 0) {
            if (n > cap) return FB_ERR_TOO_LARGE;
            memcpy(payload, p, n);
            *len = n;
        } else if (key != 2) fb_cbor_skip(&r);
    }
    return r.err ? FB_ERR_PROTO : 1;
}
