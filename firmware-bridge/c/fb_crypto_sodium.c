/* fb_crypto_sodium.c: the crypto backend on libsodium (crypto_aead_chacha20poly1305_ietf_*). */
#include <sodium.h>

#include "fb_crypto.h"

static int sodium_ready(void) {
    static int ready = 0;
    if (!ready) ready = sodium_init() >= 0;
    return ready;
}

static int seal(uint8_t *out, const uint8_t *m, size_t mlen, const uint8_t *ad, size_t adlen,
                const uint8_t nonce[FB_NONCE_BYTES], const uint8_t key[FB_KEY_BYTES]) {
    unsigned long long clen = 0;
    if (!sodium_ready()) return -1;
    return crypto_aead_chacha20poly1305_ietf_encrypt(out, &clen, m, mlen, ad, adlen, NULL, nonce, key);
}

static int open_(uint8_t *out, const uint8_t *c, size_t clen, const uint8_t *ad, size_t adlen,
                 const uint8_t nonce[FB_NONCE_BYTES], const uint8_t key[FB_KEY_BYTES]) {
    unsigned long long mlen = 0;
    if (!sodium_ready()) return -1;
    return crypto_aead_chacha20poly1305_ietf_decrypt(out, &mlen, NULL, c, clen, ad, adlen, nonce, key);
}

const fb_crypto_t fb_crypto_sodium = {seal, open_};
