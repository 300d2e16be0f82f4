/*
 * fb_port.h: the porting layer. A firmware author fills one fb_port_t with functions for the
 * device's transport, clock and key storage; the client calls nothing else on the platform.
 */
#ifndef FB_PORT_H
#define FB_PORT_H

#include <stddef.h>
#include <stdint.h>

typedef struct fb_port {
    void *ctx; /* passed back to every function */

    /* Sends n bytes: one datagram (UDP) or the bytes of one frame (serial). Returns 0 on success. */
    int (*send)(void *ctx, const uint8_t *buf, size_t n);

    /* Waits up to timeout_ms for input. UDP: returns the length of one datagram. Serial: returns
     * however many bytes arrived (the client finds frame boundaries). 0 on timeout, < 0 on error. */
    int (*recv)(void *ctx, uint8_t *buf, size_t cap, uint32_t timeout_ms);

    /* A monotonic millisecond clock (wrapping is fine). */
    uint32_t (*now_ms)(void *ctx);

    /* The 32-byte device key from protected storage. Returns 0 on success. */
    int (*load_key)(void *ctx, uint8_t key[32]);

    /* The boot epoch in non-volatile memory (a missing value reads as 0). Returns 0 on success. */
    int (*load_epoch)(void *ctx, uint16_t *epoch);
    int (*store_epoch)(void *ctx, uint16_t epoch);
} fb_port_t;

#endif
