/*
 * fb_silence: the client against a bridge that never answers. Runs N polls (argv[1], default 400) on a port whose
 * receive always times out, and prints one line per frame sent, "epoch seq", then "stored K" (epoch writes to NVM,
 * the boot's included). The TypeScript test (test/bridge-e2e.test.ts) checks when the sequence skips ahead and when
 * new epochs start.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../fb.h"

static uint32_t clock_ms;
static uint16_t stored_epoch;
static unsigned stores;

static int send_(void *ctx, const uint8_t *buf, size_t n) {
    (void)ctx;
    if (n < FB_HEADER_BYTES) return -1;
    unsigned epoch = (unsigned)buf[5] | (unsigned)buf[6] << 8;
    unsigned long seq = (unsigned long)buf[7] | (unsigned long)buf[8] << 8 | (unsigned long)buf[9] << 16 | (unsigned long)buf[10] << 24;
    printf("%u %lu\n", epoch, seq);
    return 0;
}
static int recv_(void *ctx, uint8_t *buf, size_t cap, uint32_t timeout_ms) {
    (void)ctx;
    (void)buf;
    (void)cap;
    clock_ms += timeout_ms;
    return 0;
}
static uint32_t now_(void *ctx) {
    (void)ctx;
    return clock_ms;
}
static int load_key_(void *ctx, uint8_t key[32]) {
    (void)ctx;
    memset(key, 7, 32);
    return 0;
}
static int load_epoch_(void *ctx, uint16_t *epoch) {
    (void)ctx;
    *epoch = stored_epoch;
    return 0;
}
static int store_epoch_(void *ctx, uint16_t epoch) {
    (void)ctx;
    stored_epoch = epoch;
    stores++;
    return 0;
}

static fb_client_t client;

int main(int argc, char **argv) {
    int polls = argc > 1 ? atoi(argv[1]) : 400;
    const fb_port_t port = {NULL, send_, recv_, now_, load_key_, load_epoch_, store_epoch_};
    const fb_config_t cfg = {&port, &fb_crypto_sodium, 0x01020304u, FB_LINK_DATAGRAM, 10, 1};
    if (fb_init(&client, &cfg) != FB_OK) return 1;
    for (int i = 0; i < polls; i++) {
        uint8_t payload[16];
        size_t len;
        if (fb_poll(&client, payload, sizeof payload, &len) != FB_ERR_TIMEOUT) return 2;
    }
    printf("stored %u\n", stores);
    return 0;
}
