/**
 * The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2) on the broker's listeners: behind a TCP load
 * balancer or TLS terminator every client arrives from the balancer's address, so per-address limits and bans would
 * hit the whole fleet at once. With `--proxy-protocol` each connection must open with a PROXY header; the client
 * address it names is the one the limits, bans and logs use.
 *
 * The header is framed here (how many bytes belong to it) and parsed by proxy-protocol-js. A connection whose first
 * bytes are not a well-formed header within the time allowed is closed: the protocol's rule is that a receiver never
 * guesses, since a listener that took headers optionally would let any client name its own address. So a listener
 * with the PROXY protocol on must be reachable only through the balancer (docs/operations.md, "Behind a load
 * balancer").
 */
import net from 'node:net';
import { MeshError } from '@edge-mesh/protocol';
import { Command, IPv4ProxyAddress, IPv6ProxyAddress, V1ProxyProtocol, V2ProxyProtocol } from 'proxy-protocol-js';

/** "\r\n\r\n\0\r\nQUIT\n": the 12 bytes that open a version 2 header. */
const V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
/** A version 1 line is at most 107 bytes with its CRLF. */
const V1_MAX = 107;
/** Version 2: 16 fixed bytes and the addresses; TLVs beyond this many bytes are refused. */
const V2_MAX = 16 + 2048;

export interface ProxiedSource {
  /** The client's address as the balancer saw it; undefined for a LOCAL (v2) or UNKNOWN (v1) header, e.g. a health check. */
  address: string | undefined;
  /** Bytes read past the header: the start of the client's own stream. */
  rest: Buffer;
}

/** How the bytes read so far stand: more needed, a complete header of `length` bytes, or not a header at all. */
export function frameProxyHeader(buf: Buffer): { need: true } | { length: number } | { error: string } {
  if (buf.length === 0) return { need: true };
  if (buf[0] === 0x0d) {
    const head = buf.subarray(0, Math.min(buf.length, V2_SIGNATURE.length));
    if (!V2_SIGNATURE.subarray(0, head.length).equals(head)) return { error: 'not a PROXY header' };
    if (buf.length < 16) return { need: true };
    const length = 16 + buf.readUInt16BE(14);
    if (length > V2_MAX) return { error: `PROXY v2 header of ${length} bytes (at most ${V2_MAX})` };
    return buf.length >= length ? { length } : { need: true };
  }
  const prefix = Buffer.from('PROXY ');
  const head = buf.subarray(0, Math.min(buf.length, prefix.length));
  if (!prefix.subarray(0, head.length).equals(head)) return { error: 'not a PROXY header' };
  const end = buf.indexOf('\r\n');
  if (end === -1) return buf.length >= V1_MAX ? { error: `PROXY v1 line longer than ${V1_MAX} bytes` } : { need: true };
  if (end + 2 > V1_MAX) return { error: `PROXY v1 line longer than ${V1_MAX} bytes` };
  return { length: end + 2 };
}

/** The client address a complete header names (undefined for LOCAL/UNKNOWN); throws on a malformed header. */
export function sourceOfProxyHeader(header: Buffer): string | undefined {
  if (header[0] === 0x0d) {
    const parsed = V2ProxyProtocol.parse(new Uint8Array(header.buffer, header.byteOffset, header.length));
    if (parsed.command === Command.LOCAL) return undefined;
    const addr = parsed.proxyAddress;
    if (addr instanceof IPv4ProxyAddress) return addr.sourceAddress.address.join('.');
    if (addr instanceof IPv6ProxyAddress) {
      const bytes = Buffer.from(addr.sourceAddress.address);
      const groups: string[] = [];
      for (let i = 0; i < 16; i += 2) groups.push(bytes.readUInt16BE(i).toString(16));
      return canonicalAddress(groups.join(':'));
    }
    return undefined;
  }
  const line = header.toString('latin1');
  if (line.startsWith('PROXY UNKNOWN')) return undefined;
  return canonicalAddress(V1ProxyProtocol.parse(line).source.ipAddress);
}

/** An IP address as Node writes a socket's (IPv6 compressed), so one client is one key; throws for anything else. */
function canonicalAddress(text: string): string {
  const family = net.isIP(text);
  if (family === 0) throw new MeshError('MESH_BAD_REQUEST', `not an IP address: ${JSON.stringify(text.slice(0, 64))}`);
  return new net.SocketAddress({ address: text, family: family === 4 ? 'ipv4' : 'ipv6' }).address;
}

/**
 * Reads the PROXY header off a fresh socket. Resolves with the client's address and the bytes read past the header,
 * leaving the socket paused and with no 'data' listener; rejects with MESH_BAD_REQUEST when the first bytes are not a
 * header, or MESH_TIMEOUT when none arrived within `timeoutMs` (the socket is left to the caller to close).
 */
export function readProxyHeader(socket: net.Socket, timeoutMs: number): Promise<ProxiedSource> {
  return new Promise((resolve, reject) => {
    let buf: Buffer = Buffer.alloc(0);
    const done = (): void => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('close', onClose);
      socket.pause();
    };
    const fail = (err: MeshError): void => {
      done();
      reject(err);
    };
    const onData = (chunk: Buffer): void => {
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      const framed = frameProxyHeader(buf);
      if ('need' in framed) return;
      if ('error' in framed) {
        fail(new MeshError('MESH_BAD_REQUEST', framed.error));
        return;
      }
      let address: string | undefined;
      try {
        address = sourceOfProxyHeader(buf.subarray(0, framed.length));
      } catch (err) {
        fail(new MeshError('MESH_BAD_REQUEST', `malformed PROXY header: ${(err as Error).message ?? err}`));
        return;
      }
      done();
      resolve({ address, rest: buf.subarray(framed.length) });
    };
    const onClose = (): void => fail(new MeshError('MESH_BAD_REQUEST', 'closed before its PROXY header'));
    const timer = setTimeout(() => fail(new MeshError('MESH_TIMEOUT', `no PROXY header within ${timeoutMs} ms`)), timeoutMs);
    socket.on('data', onData);
    socket.once('close', onClose);
  });
}
