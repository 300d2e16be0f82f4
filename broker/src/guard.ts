/**
 * Framing guard: reads the MQTT fixed header (packet type byte + Remaining Length varint) of every packet as the
 * bytes arrive from the kernel and rejects the connection as soon as a packet declares more than the size cap, before
 * any of its body is buffered. aedes' own parser (mqtt-packet) would otherwise accumulate a declared 256 MB PUBLISH.
 *
 * The guard is installed on the real `net.Socket` by interposing on `socket.push`, which is where Node hands every
 * chunk read from the kernel to the Readable side (and `push(null)` at EOF). aedes is then given the socket itself,
 * so writes, cork/uncork, 'drain', errors, close, `remoteAddress` and TCP_NODELAY all stay native and no second
 * stream sits on the hot path: an accepted chunk is passed on as the same Buffer, uncopied, and the per-chunk cost is
 * one jump per packet header inside the chunk (not a scan of the body bytes).
 */
import type { Duplex } from 'node:stream';
import { MeshError } from '@edge-mesh/protocol';

/** The largest Remaining Length MQTT 3.1.1 can encode (4 varint bytes). */
export const MQTT_MAX_REMAINING_LENGTH = 268_435_455;

const CONNECT_FIRST_BYTE = 0x10;

export type GuardRejection =
  | { reason: 'not-mqtt'; firstByte: number }
  | { reason: 'bad-packet-type'; firstByte: number }
  | { reason: 'bad-remaining-length' }
  | { reason: 'packet-too-large'; declaredBytes: number; maxPacketBytes: number };

/**
 * Incremental MQTT fixed-header scanner. `accept(chunk)` returns undefined while the stream is acceptable, or the
 * rejection; once rejected it stays rejected.
 *
 * State across chunks: `skip` body bytes still to pass over; otherwise we are either at a packet's first byte
 * (`lenBytes === -1`) or inside its Remaining Length varint (`lenBytes` bytes read so far, value in `len`).
 */
export class PacketSizeGuard {
  private skip = 0;
  private lenBytes = -1;
  private len = 0;
  private mul = 1;
  private first = true;
  private rejected: GuardRejection | undefined;

  constructor(private readonly maxPacketBytes: number) {}

  /** Records the first rejection; every later chunk gets the same answer. */
  private reject(rejection: GuardRejection): GuardRejection {
    this.rejected = rejection;
    return rejection;
  }

  accept(chunk: Buffer): GuardRejection | undefined {
    if (this.rejected) return this.rejected;
    const n = chunk.length;
    let i = 0;
    // Fast path: the chunk lies entirely inside the body of the current packet.
    if (this.skip >= n) {
      this.skip -= n;
      return undefined;
    }
    i = this.skip;
    this.skip = 0;
    while (i < n) {
      if (this.lenBytes === -1) {
        const b = chunk[i++]!;
        const type = b >> 4;
        if (this.first) {
          this.first = false;
          // Every MQTT connection starts with CONNECT; anything else (HTTP, TLS hello, garbage) is dropped at once.
          if (b !== CONNECT_FIRST_BYTE) return this.reject({ reason: 'not-mqtt', firstByte: b });
        } else if (type === 0 || type === 15) {
          // 0 is reserved, 15 is MQTT 5 AUTH: neither exists in 3.1.1.
          return this.reject({ reason: 'bad-packet-type', firstByte: b });
        }
        this.lenBytes = 0;
        this.len = 0;
        this.mul = 1;
        continue;
      }
      const b = chunk[i++]!;
      this.len += (b & 0x7f) * this.mul;
      this.lenBytes++;
      if (b & 0x80) {
        if (this.lenBytes === 4) return this.reject({ reason: 'bad-remaining-length' });
        this.mul *= 128;
        continue;
      }
      const declaredBytes = 1 + this.lenBytes + this.len;
      if (declaredBytes > this.maxPacketBytes) {
        return this.reject({ reason: 'packet-too-large', declaredBytes, maxPacketBytes: this.maxPacketBytes });
      }
      this.lenBytes = -1;
      const rest = n - i;
      if (this.len > rest) {
        this.skip = this.len - rest;
        return undefined;
      }
      i += this.len;
    }
    return undefined;
  }
}

/**
 * Installs the guard on a socket before anything reads from it. On a rejection the chunk is not buffered, the
 * socket is destroyed with an Error (so whoever holds it sees 'error' then 'close'), and `onReject` is told why.
 */
export function guardSocket(socket: Duplex, maxPacketBytes: number, onReject: (rejection: GuardRejection) => void): void {
  const guard = new PacketSizeGuard(maxPacketBytes);
  const push = socket.push;
  socket.push = function guardedPush(this: Duplex, chunk: unknown, encoding?: BufferEncoding): boolean {
    if (chunk !== null && Buffer.isBuffer(chunk)) {
      const rejection = guard.accept(chunk);
      if (rejection !== undefined) {
        if (!socket.destroyed) {
          onReject(rejection);
          const code = rejection.reason === 'packet-too-large' ? 'MESH_TOO_LARGE' : 'MESH_BAD_REQUEST';
          socket.destroy(new MeshError(code, `MQTT framing guard: ${rejection.reason}`, { details: rejection }));
        }
        return false;
      }
    }
    return push.call(this, chunk, encoding);
  };
}

/**
 * Per-connection inbound byte rate (docs/security.md, "Hostile input"): a token bucket of `burstBytes` refilled at
 * `bytesPerSec`, charged for every chunk the kernel hands over. When it runs dry the broker stops reading the socket
 * until the bucket is back above zero: the chunks already read wait in the socket's buffer, Node stops reading from
 * the kernel once that buffer is full, and TCP flow control slows the sender. Nothing is dropped and nobody else
 * waits. This is the "pause receiving client messages" behaviour EMQX documents for its per-client `bytes_rate`
 * limiter (emqx/emqx-docs, en_US/rate-limit/rate-limit.md).
 *
 * aedes reads in paused mode (`'readable'` + `read(null)`, aedes lib/client.js), so pausing is done by answering
 * `read()` with null while throttled and emitting `'readable'` once the bucket has refilled.
 */
export class ByteBucket {
  private tokens: number;
  private last: number;

  constructor(
    private readonly bytesPerSec: number,
    private readonly burstBytes: number,
    now: number,
  ) {
    this.tokens = burstBytes;
    this.last = now;
  }

  private refill(now: number): void {
    this.tokens = Math.min(this.burstBytes, this.tokens + ((now - this.last) * this.bytesPerSec) / 1000);
    this.last = now;
  }

  /** Charges `bytes`; returns how long to wait (ms) before reading again, 0 when the bucket is not overdrawn. */
  take(bytes: number, now: number): number {
    this.refill(now);
    this.tokens -= bytes;
    return this.waitMs(now);
  }

  /** How long until the bucket is back above zero. */
  waitMs(now: number): number {
    this.refill(now);
    return this.tokens >= 0 ? 0 : Math.ceil((-this.tokens * 1000) / this.bytesPerSec);
  }
}

/** Installs the byte-rate limit on a socket before anything reads from it; `onThrottle` is told of each pause. */
export function throttleSocket(socket: Duplex, bytesPerSec: number, burstBytes: number, onThrottle: (waitMs: number) => void): void {
  const bucket = new ByteBucket(bytesPerSec, burstBytes, Date.now());
  let timer: NodeJS.Timeout | undefined;
  const push = socket.push;
  const read = socket.read;
  const resume = (): void => {
    timer = undefined;
    if (socket.destroyed) return;
    const waitMs = bucket.waitMs(Date.now());
    if (waitMs > 0) {
      timer = setTimeout(resume, waitMs);
      return;
    }
    socket.emit('readable');
  };
  socket.push = function throttledPush(this: Duplex, chunk: unknown, encoding?: BufferEncoding): boolean {
    if (chunk !== null && Buffer.isBuffer(chunk) && timer === undefined) {
      const waitMs = bucket.take(chunk.length, Date.now());
      if (waitMs > 0) {
        onThrottle(waitMs);
        timer = setTimeout(resume, waitMs);
      }
    } else if (chunk !== null && Buffer.isBuffer(chunk)) {
      bucket.take(chunk.length, Date.now());
    }
    return push.call(this, chunk, encoding);
  };
  socket.read = function throttledRead(this: Duplex, n?: number) {
    if (timer !== undefined) return null;
    return read.call(this, n);
  };
  socket.once('close', () => clearTimeout(timer));
}
