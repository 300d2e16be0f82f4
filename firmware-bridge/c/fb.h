/*
 * fb.h: reference client of the edge-mesh firmware bridge protocol v1 (docs/firmware-protocol.md).
 * C99, no dynamic allocation: one fb_client_t holds every buffer. Platform access goes through
 * fb_port_t (fb_port.h), cryptography through fb_crypto_t (fb_crypto.h).
 *
 *   fb_client_t c;                     // static storage: it holds the frame buffers
 *   fb_init(&c, &cfg);                 // loads the key, bumps and stores the boot epoch
 *   fb_hello(&c, 0, 30);               // learns the bridge's model table
 *   fb_infer(&c, fb_model_id(&c, "kws"), samples, n, scale, shape, 3, 200, 0, &result);
 */
#ifndef FB_H
#define FB_H

#include <stddef.h>
#include <stdint.h>

#include "fb_crypto.h"
#include "fb_port.h"

#ifndef FB_MAX_PACKET
#define FB_MAX_PACKET 8192 /* largest packet (header + body + tag) this client sends or takes */
#endif
#ifndef FB_MAX_MODELS
#define FB_MAX_MODELS 8
#endif
#define FB_MODEL_NAME 24
#define FB_HEADER_BYTES 11
#define FB_MAX_FRAME (FB_MAX_PACKET + 2 + (FB_MAX_PACKET + 2) / 254 + 3)

/* Frame types (header byte 0, low 5 bits). */
enum {
    FB_HELLO = 1, FB_WELCOME = 2, FB_INFER_REQ = 3, FB_INFER_RESP = 4, FB_TELEMETRY = 5,
    FB_DOWNLINK = 6, FB_ACK = 7, FB_SLEEP = 8, FB_POLL = 9, FB_ERROR = 31
};

/* Return codes. FB_ERR_REMOTE: the bridge answered ERROR; its code is in c->last_error. */
enum {
    FB_OK = 0, FB_ERR_TIMEOUT = -1, FB_ERR_REMOTE = -2, FB_ERR_PROTO = -3, FB_ERR_PORT = -4,
    FB_ERR_TOO_LARGE = -5, FB_ERR_CRYPTO = -6, FB_ERR_ARG = -7
};

typedef enum { FB_LINK_DATAGRAM = 0, FB_LINK_SERIAL = 1 } fb_link_t;

typedef struct {
    const fb_port_t *port;
    const fb_crypto_t *crypto;
    uint32_t device_id;
    fb_link_t link;
    uint32_t timeout_ms; /* per try (default 1000) */
    uint8_t tries;       /* sends of the same frame before giving up (default 3) */
} fb_config_t;

typedef struct {
    uint32_t label;     /* index of the highest output value */
    float score;        /* that value */
    uint32_t latency_ms;
    char agent[20];     /* start of the serving agent's id */
    uint8_t receipt_ref[8];
    float *output;      /* optional: where the raw first output goes (want_raw) */
    size_t output_cap;  /* in floats */
    size_t output_n;    /* floats written */
} fb_result_t;

typedef struct {
    fb_config_t cfg;
    uint8_t key[32];
    uint16_t epoch;
    uint32_t seq;
    uint32_t fails;      /* exchanges in a row without an answer */
    uint32_t bump_at;    /* at this many, the next new epoch (see exchange() in fb_client.c) */
    uint32_t bump_gap;   /* silent exchanges between new epochs, doubling up to FB_MAX_EPOCH_GAP */
    int last_error;      /* code of the last ERROR frame */
    uint8_t pending;     /* downlinks the bridge holds for us (key 20 of the last reply) */
    uint8_t n_models;
    struct { uint16_t id; char name[FB_MODEL_NAME]; } models[FB_MAX_MODELS];
    /* buffers */
    uint8_t tx[FB_MAX_PACKET + 2];
    size_t tx_n;
    uint8_t body[FB_MAX_PACKET];
    uint8_t rx[FB_MAX_FRAME];
    uint8_t reply[FB_MAX_PACKET];
    size_t reply_n;
    uint8_t reply_type;
    uint8_t wire[FB_MAX_FRAME];
    size_t acc_n;
    int acc_overflow;
} fb_client_t;

int fb_init(fb_client_t *c, const fb_config_t *cfg);
/* HELLO → WELCOME: announces the sleep period (0 = always on) and keepalive, reads the model table. */
int fb_hello(fb_client_t *c, uint32_t sleep_period_s, uint32_t keepalive_s);
/* The id of a model in the bridge's table, or 0. */
uint16_t fb_model_id(const fb_client_t *c, const char *name);
/* Runs a model on n int16 samples (value = sample × scale). shape may be NULL (the model's own). */
int fb_infer(fb_client_t *c, uint16_t model_id, const int16_t *samples, size_t n, float scale,
             const uint32_t *shape, uint8_t rank, uint32_t deadline_ms, int want_raw, fb_result_t *res);
/* Resends the last request frame unchanged (a retransmit) and reads its reply as an inference result. */
int fb_infer_retransmit(fb_client_t *c, fb_result_t *res);
/* Sensor readings [[index, value], ...]. */
int fb_telemetry(fb_client_t *c, const uint16_t *index, const float *value, size_t n);
/* Asks for one queued downlink. Returns 1 and fills payload when one came, 0 when none. */
int fb_poll(fb_client_t *c, uint8_t *payload, size_t cap, size_t *len);
/* Tells the bridge this device sleeps for `seconds` (it shows as asleep, not offline). */
int fb_sleep(fb_client_t *c, uint32_t seconds);
/* Starts a new epoch (stored first) and restarts the sequence at 1. fb_init does this at boot. */
int fb_new_epoch(fb_client_t *c);

/* Link helpers (fb_link.c). */
uint16_t fb_crc16(const uint8_t *b, size_t n);
size_t fb_cobs_encode(const uint8_t *in, size_t n, uint8_t *out, size_t cap);
size_t fb_cobs_decode(const uint8_t *in, size_t n, uint8_t *out, size_t cap);
/* packet needs 2 spare bytes after n (the CRC goes there). Returns the frame length, 0 if cap is too small. */
size_t fb_serial_encode(uint8_t *packet, size_t n, uint8_t *out, size_t cap);
/* Seals header + body into out (header, ciphertext, tag); returns the packet length or 0. */
size_t fb_seal_packet(const fb_crypto_t *crypto, const uint8_t key[32], uint8_t type, uint32_t device_id,
                      uint16_t epoch, uint32_t seq, uint8_t direction, const uint8_t *body, size_t n,
                      uint8_t *out, size_t cap);
/* Opens a packet sealed in `direction`; returns the body length, or -1. */
int fb_open_packet(const fb_crypto_t *crypto, const uint8_t key[32], const uint8_t *packet, size_t n,
                   uint8_t direction, uint8_t *body, size_t cap);

#endif
