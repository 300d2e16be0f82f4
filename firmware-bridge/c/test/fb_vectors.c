/*
 * fb_vectors: checks the C side against the golden vectors (firmware-bridge/vectors/golden.json).
 * The TypeScript test feeds each vector as one line on stdin:
 *   name key_hex type device_id epoch seq direction body_hex packet_hex serial_frame_hex
 * For each, the packet sealed here must equal packet_hex byte for byte, its serial frame must equal
 * serial_frame_hex, and opening packet_hex must give body_hex back. Prints "ok name" or "FAIL name: why".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../fb.h"

static size_t unhex(const char *s, uint8_t *out, size_t cap) {
    size_t n = strlen(s) / 2;
    if (n > cap || strcmp(s, "-") == 0) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        sscanf(s + 2 * i, "%2x", &v);
        out[i] = (uint8_t)v;
    }
    return n;
}

static char line[65536], name[128], keyh[80], bodyh[20000], packeth[20000], frameh[25000];
static uint8_t key[32], body[8192], packet[8200], want_packet[8200], frame[9000], want_frame[9000], opened[8192];

int main(void) {
    int failures = 0, total = 0;
    while (fgets(line, sizeof line, stdin)) {
        unsigned type, dir, epoch;
        unsigned long device_id, seq;
        if (sscanf(line, "%127s %79s %u %lu %u %lu %u %19999s %19999s %24999s", name, keyh, &type, &device_id, &epoch, &seq, &dir,
                   bodyh, packeth, frameh) != 10)
            continue;
        total++;
        unhex(keyh, key, 32);
        size_t bn = unhex(bodyh, body, sizeof body);
        size_t pn = unhex(packeth, want_packet, sizeof want_packet);
        size_t fn = unhex(frameh, want_frame, sizeof want_frame);
        size_t n = fb_seal_packet(&fb_crypto_sodium, key, (uint8_t)type, (uint32_t)device_id, (uint16_t)epoch, (uint32_t)seq, (uint8_t)dir,
                                  body, bn, packet, sizeof packet - 2);
        if (n != pn || memcmp(packet, want_packet, n) != 0) {
            printf("FAIL %s: sealed packet differs\n", name);
            failures++;
            continue;
        }
        size_t m = fb_serial_encode(packet, n, frame, sizeof frame);
        if (m != fn || memcmp(frame, want_frame, m) != 0) {
            printf("FAIL %s: serial frame differs\n", name);
            failures++;
            continue;
        }
        int on = fb_open_packet(&fb_crypto_sodium, key, want_packet, pn, (uint8_t)dir, opened, sizeof opened);
        if (on != (int)bn || memcmp(opened, body, bn) != 0) {
            printf("FAIL %s: opening gives another body\n", name);
            failures++;
            continue;
        }
        want_packet[1] ^= 1; /* a changed header must fail the tag */
        if (fb_open_packet(&fb_crypto_sodium, key, want_packet, pn, (uint8_t)dir, opened, sizeof opened) >= 0) {
            printf("FAIL %s: a tampered header still opens\n", name);
            failures++;
            continue;
        }
        printf("ok %s\n", name);
    }
    printf("%d of %d vectors passed\n", total - failures, total);
    return failures || total == 0 ? 1 : 0;
}
