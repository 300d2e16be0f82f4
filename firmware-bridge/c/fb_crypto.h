/*
 * fb_crypto.h: the crypto backend interface. The frame protocol needs one AEAD:
 * ChaCha20-Poly1305 (RFC 8439, IETF variant: 12-byte nonce, 16-byte tag appended to the ciphertext).
 * fb_crypto_sodium.c implements it with libsodium for host builds; see README.md for MCU libraries.
 */
#ifndef FB_CRYPTO_H
#define FB_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

#define FB_KEY_BYTES 32
#define FB_NONCE_BYTES 12
#define FB_TAG_BYTES 16

typedef struct fb_crypto {
    /* out = ciphertext(m) || tag, mlen + 16 bytes. out may equal m. Returns 0 on success. */
    int (*seal)(uint8_t *out, const uint8_t *m, size_t mlen, const uint8_t *ad, size_t adlen,
                const uint8_t nonce[FB_NONCE_BYTES], const uint8_t key[FB_KEY_BYTES]);
    /* c is ciphertext || tag (clen >= 16); out gets clen - 16 bytes. Returns 0 only if the tag verifies. */
    int (*open)(uint8_t *out, const uint8_t *c, size_t clen, const uint8_t *ad, size_t adlen,
                const uint8_t nonce[FB_NONCE_BYTES], const uint8_t key[FB_KEY_BYTES]);
} fb_crypto_t;

/* The libsodium backend (host builds: link with -lsodium). */
extern const fb_crypto_t fb_crypto_sodium;

#endif
