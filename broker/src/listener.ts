/**
 * The TCP listener in front of aedes: TCP_NODELAY on every socket, the connection cap, the per-address connection
 * limit and ban at accept (./limits.ts), and the framing guard (./guard.ts) installed before aedes reads a byte.
 */
import net from 'node:net';
import type { Logger } from 'pino';
import { clientOfSocket } from './aedes-adapter.ts';
import { guardSocket } from './guard.ts';
import type { IpGuard } from './limits.ts';
import type { WarnThrottled } from './log.ts';

export interface ListenerOptions {
  ips: IpGuard;
  maxPacketBytes: number;
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
  /** Refuses new sockets from now on. */
  stopAccepting(): void;
  /** Closes the server and destroys the sockets aedes never registered (no CONNECT yet) or that are still closing. */
  close(): Promise<void>;
}

export function createListener(options: ListenerOptions): Listener {
  const { ips, maxPacketBytes, log, warnThrottled } = options;
  const socketIps = new WeakMap<object, string>();
  const sockets = new Set<net.Socket>();
  let accepting = true;

  const server = net.createServer({ noDelay: true }, (socket) => {
    if (!accepting) {
      socket.destroy();
      return;
    }
    const ip = socket.remoteAddress ?? 'unknown';
    const verdict = ips.accept(ip, Date.now());
    if (verdict !== 'ok') {
      // Banned addresses are dropped before a byte is read; one IP cannot take the whole connection cap.
      if (verdict === 'too-many-connections') warnThrottled(`accept:${ip}`, { remoteAddress: ip, reason: verdict }, 'connection dropped');
      else log.debug({ remoteAddress: ip, reason: verdict }, 'connection dropped');
      socket.destroy();
      return;
    }
    socketIps.set(socket, ip);
    sockets.add(socket);
    socket.once('close', () => {
      sockets.delete(socket);
      ips.release(ip);
    });
    guardSocket(socket, maxPacketBytes, (rejection) => {
      log.warn(
        { clientId: clientOfSocket(socket)?.id ?? null, topic: undefined, remoteAddress: socket.remoteAddress, ...rejection },
        'connection dropped by framing guard',
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
