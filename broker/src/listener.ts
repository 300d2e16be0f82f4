/**
 * The TCP listener in front of aedes: TCP_NODELAY on every socket, the connection cap, the per-address cap on sockets
 * that have not finished CONNECT, and the framing guard and byte-rate limit (./guard.ts) installed before aedes reads
 * a byte.
 *
 * The per-address cap evicts rather than refuses: when an address already holds `maxPendingPerIp` sockets that have
 * not finished CONNECT, its oldest such socket is closed to make room. A flood of idle sockets then only recycles
 * its own sockets, while a real client, whose CONNECT follows its TCP handshake at once, still gets in; a client
 * that finished CONNECT is never counted or evicted (docs/security.md, "Connecting").
 */
import net from 'node:net';
import type { Logger } from 'pino';
import { clientOfSocket } from './aedes-adapter.ts';
import { guardSocket, throttleSocket } from './guard.ts';
import type { WarnThrottled } from './log.ts';

export interface ListenerOptions {
  /** Sockets per address that have not finished CONNECT; beyond it the oldest is closed. */
  maxPendingPerIp: number;
  maxPacketBytes: number;
  /** Per-connection inbound byte rate and burst. */
  byteRatePerClient: number;
  byteBurstPerClient: number;
  maxConnections: number;
  log: Logger;
  warnThrottled: WarnThrottled;
  /** Hands an accepted, guarded socket to aedes. */
  handle(socket: net.Socket): void;
}

export interface Listener {
  readonly server: net.Server;
  /** The address a socket came from, read once at accept (remoteAddress is gone after a destroy). */
  addressOf(socket: unknown): string | undefined;
  /** Binds; resolves with the bound port. */
  listen(port: number, host: string): Promise<number>;
  /** The socket's client finished CONNECT: it no longer counts against its address's pending cap. */
  established(socket: unknown): void;
  /** Refuses new sockets from now on. */
  stopAccepting(): void;
  /** Closes the server and destroys the sockets aedes never registered (no CONNECT yet) or that are still closing. */
  close(): Promise<void>;
}

export function createListener(options: ListenerOptions): Listener {
  const { maxPendingPerIp, maxPacketBytes, log, warnThrottled } = options;
  const socketIps = new WeakMap<object, string>();
  const sockets = new Set<net.Socket>();
  /** Per address, its sockets that have not finished CONNECT, oldest first (a Set keeps insertion order). */
  const pending = new Map<string, Set<net.Socket>>();
  let accepting = true;

  const unpend = (ip: string, socket: net.Socket): void => {
    const set = pending.get(ip);
    if (set === undefined) return;
    set.delete(socket);
    if (set.size === 0) pending.delete(ip);
  };

  const server = net.createServer({ noDelay: true }, (socket) => {
    if (!accepting) {
      socket.destroy();
      return;
    }
    const ip = socket.remoteAddress ?? 'unknown';
    let set = pending.get(ip);
    if (set === undefined) {
      set = new Set();
      pending.set(ip, set);
    }
    if (set.size >= maxPendingPerIp) {
      const oldest = set.values().next().value as net.Socket;
      set.delete(oldest);
      warnThrottled(`accept:${ip}`, { remoteAddress: ip, reason: 'too-many-connections' }, 'oldest connection without CONNECT closed');
      oldest.destroy();
    }
    set.add(socket);
    socketIps.set(socket, ip);
    sockets.add(socket);
    socket.once('close', () => {
      sockets.delete(socket);
      unpend(ip, socket);
    });
    guardSocket(socket, maxPacketBytes, (rejection) => {
      log.warn(
        { clientId: clientOfSocket(socket)?.id ?? null, topic: undefined, remoteAddress: socket.remoteAddress, ...rejection },
        'connection dropped by framing guard',
      );
    });
    throttleSocket(socket, options.byteRatePerClient, options.byteBurstPerClient, (waitMs) => {
      const clientId = clientOfSocket(socket)?.id ?? null;
      warnThrottled(
        `bytes:${ip}:${clientId}`,
        { clientId, remoteAddress: ip, reason: 'byte-rate', waitMs },
        'reading paused: over the byte rate',
      );
    });
    options.handle(socket);
  });
  server.maxConnections = options.maxConnections;
  server.on('drop', (data) =>
    warnThrottled('drop', { remoteAddress: data?.remoteAddress, reason: 'max-connections' }, 'connection dropped'),
  );

  return {
    server,
    addressOf: (socket) => (socket !== null && typeof socket === 'object' ? socketIps.get(socket) : undefined),
    established(socket) {
      if (socket === null || typeof socket !== 'object') return;
      const ip = socketIps.get(socket);
      if (ip !== undefined) unpend(ip, socket as net.Socket);
    },
    async listen(port, host) {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, host, () => {
          server.off('error', reject);
          resolve();
        });
      });
      server.on('error', (err) => log.error({ err }, 'server error'));
      return (server.address() as net.AddressInfo).port;
    },
    stopAccepting() {
      accepting = false;
    },
    async close() {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const socket of sockets) socket.destroy();
      await closed;
    },
  };
}
