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
import type { Socket } from 'node:net';
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
export function guardSocket(socket: Socket, maxPacketBytes: number, onReject: (rejection: GuardRejection) => void): void {
  const guard = new PacketSizeGuard(maxPacketBytes);
  const push = socket.push;
  socket.push = function guardedPush(this: Socket, chunk: unknown, encoding?: BufferEncoding): boolean {
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
