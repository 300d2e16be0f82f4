/** UDP transport: one packet per datagram (the UDP checksum covers line errors), replies go back to the sender's address. */
import dgram from 'node:dgram';
import { readFileSync } from 'node:fs';
import type { Bridge } from './bridge.ts';

/** The bridge's default UDP port (next to CoAP's 5683/5684). */
export const DEFAULT_UDP_PORT = 5685;

/** What the UDP transport counted (docs/bridge.md, "Counters"). */
export interface UdpStats {
  /** Datagrams read from the socket and handed to the bridge (which counts the frames it drops in `stats.dropped`). */
  datagrams: number;
  /** Replies sent, and replies the socket could not send (the device retransmits). */
  replies: number;
  replyErrors: number;
  /**
   * Datagrams the kernel dropped before the bridge could read them (its receive buffer was full): the `drops` column
   * of this socket's line in /proc/net/udp (Linux, net/ipv4/udp.c, udp4_format_sock). Undefined where that cannot be read.
   */
  kernelDrops: number | undefined;
}

export interface UdpTransport {
  readonly port: number;
  readonly address: string;
  stats(): UdpStats;
  close(): Promise<void>;
}

export interface UdpOptions {
  port?: number;
  host?: string;
  /** SO_RCVBUF in bytes (default: the system's). */
  recvBufferSize?: number;
}

/** The `drops` count of the UDP socket bound to local `port`, from /proc/net/udp or udp6; undefined when not found. */
export function procUdpDrops(port: number, family: 4 | 6): number | undefined {
  let table: string;
  try {
    table = readFileSync(family === 6 ? '/proc/net/udp6' : '/proc/net/udp', 'utf8');
  } catch {
    return undefined;
  }
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  for (const line of table.split('\n').slice(1)) {
    const fields = line.trim().split(/\s+/);
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ref pointer drops
    if (fields.length < 13 || fields[1]!.split(':')[1] !== hexPort) continue;
    const drops = Number(fields[fields.length - 1]);
    return Number.isSafeInteger(drops) ? drops : undefined;
  }
  return undefined;
}

export async function listenUdp(
  bridge: Bridge,
  { port = DEFAULT_UDP_PORT, host = '127.0.0.1', recvBufferSize }: UdpOptions = {},
): Promise<UdpTransport> {
  const family = host.includes(':') ? 6 : 4;
  const socket = dgram.createSocket({ type: family === 6 ? 'udp6' : 'udp4', ...(recvBufferSize ? { recvBufferSize } : {}) });
  const counts = { datagrams: 0, replies: 0, replyErrors: 0 };
  socket.on('message', (msg, rinfo) => {
    counts.datagrams++;
    void bridge.handlePacket(
      msg,
      (reply) =>
        socket.send(reply, rinfo.port, rinfo.address, (err) => {
          if (err) counts.replyErrors++;
          else counts.replies++;
        }),
      `${rinfo.address}:${rinfo.port}`,
    );
  });
  socket.on('error', () => {
    /* ICMP unreachable and the like: the device retransmits */
  });
  await new Promise<void>((resolve, reject) => {
    socket.once('error', reject);
    socket.bind(port, host, () => {
      socket.off('error', reject);
      resolve();
    });
  });
  const addr = socket.address();
  let closedDrops: number | undefined;
  let closed = false;
  return {
    port: addr.port,
    address: addr.address,
    stats: () => ({ ...counts, kernelDrops: closed ? closedDrops : procUdpDrops(addr.port, family) }),
    close: () => {
      if (closed) return Promise.resolve();
      // The socket's /proc line goes with it: keep its last count.
      closedDrops = procUdpDrops(addr.port, family);
      closed = true;
      return new Promise<void>((resolve) => socket.close(() => resolve()));
    },
  };
}
