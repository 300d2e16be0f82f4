/**
 * The TCP listener in front of aedes: TCP_NODELAY on every socket, the connection cap, the per-address cap on sockets
 * that have not finished CONNECT, and the framing guard and byte-rate limit (./guard.ts) installed before aedes reads
 * a byte.
 *
 * The per-address cap evicts rather than refuses: when an address already holds `maxPendingPerIp` sockets that have
 * not finished CONNECT, its oldest such socket is closed to make room. A flood of idle sockets then only recycles
 * its own sockets, while a real client, whose CONNECT follows its TCP handshake at once, still gets in; a client
 * that finished CONNECT is never counted or evicted (docs/security.md, "Connecting"). All addresses together hold
 * at most half of `maxConnections` such sockets, the oldest of all closed to make room: otherwise a few addresses
 * (ten at the defaults) would fill the connection cap, and the server would refuse every new socket before any
 * eviction could run. An IPv6 address counts by its /64, which one host usually holds whole.
 *
 * With `tls` the listener is a TLS server (mqtts): a socket is handed on, guarded and throttled only once its
 * handshake is done, so the guard reads the cleartext MQTT stream; a handshake must finish within
 * `handshakeTimeoutMs`, and a failed one is logged (reason `tls`, MESH_TLS) and closed (docs/operations.md, "TLS").
 * It counts against its address's pending cap from its first byte, though, handshake included.
 *
 * With `ws`, a second port serves MQTT over WebSocket (ws://, or wss:// with `tls`) for browser clients: each
 * WebSocket becomes a byte stream that goes through the same caps, guard and byte limit, then to aedes; its socket
 * counts as pending from its TCP connection, through the HTTP upgrade, until CONNECT.
 *
 * With `proxyProtocol` every connection must open with a PROXY header (./proxy-protocol.ts), read before the TLS
 * handshake and before the guard; the address it names is the socket's address for every limit, ban and log line.
 */
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import tls from 'node:tls';
import type { WarnThrottled } from '@edge-mesh/client';
import { addressGroup } from '@edge-mesh/client';
import type { Logger } from 'pino';
import { createWebSocketStream, WebSocketServer } from 'ws';
import { clientOfSocket } from './aedes-adapter.ts';
import { guardSocket, throttleSocket } from './guard.ts';
import { readProxyHeader } from './proxy-protocol.ts';

/** MQTT 3.1.1 CONNACK, return code 5 (not authorized). */
const CONNACK_NOT_AUTHORIZED = Buffer.from([0x20, 0x02, 0x00, 0x05]);

export interface ListenerOptions {
  /** Sockets per address that have not finished CONNECT; beyond it the oldest is closed. */
  maxPendingPerIp: number;
  maxPacketBytes: number;
  /** Per-connection inbound byte rate and burst. */
  byteRatePerClient: number;
  byteBurstPerClient: number;
  maxConnections: number;
  /** Serve TLS with these options (certificate, key, and for mutual TLS the client CA and requestCert). */
  tls?: tls.TlsOptions | undefined;
  /** With `tls`: how long a handshake may take; with `proxyProtocol`, also how long the PROXY header may take. */
  handshakeTimeoutMs?: number;
  /** Every connection opens with a PROXY header (v1 or v2) from a trusted balancer; its client address is used. */
  proxyProtocol?: boolean | undefined;
  /** Also serve MQTT over WebSocket on its own port (`listenWs`), at this HTTP path. */
  wsPath?: string | undefined;
  log: Logger;
  warnThrottled: WarnThrottled;
  /**
   * Hands an accepted, guarded stream to aedes: a TCP or TLS socket, or a WebSocket's byte stream with the TCP
   * socket under it as `transport` (for byte counts).
   */
  handle(stream: Duplex, transport: net.Socket): void;
}

export interface Listener {
  readonly server: net.Server;
  /** 'mqtts' with `tls`, else 'mqtt'. */
  readonly scheme: 'mqtt' | 'mqtts';
  /** The address a socket came from, read once at accept (remoteAddress is gone after a destroy). */
  addressOf(socket: unknown): string | undefined;
  /** Binds; resolves with the bound port. */
  listen(port: number, host: string): Promise<number>;
  /** 'wss' with `tls`, else 'ws'. */
  readonly wsScheme: 'ws' | 'wss';
  /** Binds the WebSocket port (needs `wsPath`); resolves with the bound port. */
  listenWs(port: number, host: string): Promise<number>;
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
  const sockets = new Set<Duplex>();
  /** Per address, its sockets that have not finished CONNECT, oldest first (a Set keeps insertion order). */
  const pending = new Map<string, Set<Duplex>>();
  /** Every such socket, oldest first, with the key it is counted under. */
  const allPending = new Map<Duplex, string>();
  const maxPendingTotal = Math.max(1, Math.floor(options.maxConnections / 2));
  let accepting = true;
  /** With `proxyProtocol`: "address:port" of the balancer's socket → the client address its header named. */
  const proxied = new Map<string, string>();
  const peerKey = (socket: net.Socket): string => `${socket.remoteAddress}:${socket.remotePort}`;
  /** The client's address: the PROXY header's, else the socket's own. */
  const realAddress = (socket: net.Socket): string =>
    (options.proxyProtocol ? proxied.get(peerKey(socket)) : undefined) ?? socket.remoteAddress ?? 'unknown';

  /** `socket` no longer counts as pending (it finished CONNECT, closed, was evicted or handed over). */
  const unpend = (socket: Duplex): void => {
    const key = allPending.get(socket);
    if (key === undefined) return;
    allPending.delete(socket);
    const set = pending.get(key);
    if (set === undefined) return;
    set.delete(socket);
    if (set.size === 0) pending.delete(key);
  };

  const accept = (socket: net.Socket): void => admit(socket, realAddress(socket), socket);

  /**
   * Counts `socket` among its address's sockets without CONNECT, closing that address's oldest, and the oldest of all,
   * when either is at its cap.
   */
  const hold = (socket: Duplex, ip: string): void => {
    const key = addressGroup(ip);
    let set = pending.get(key);
    if (set === undefined) {
      set = new Set();
      pending.set(key, set);
    }
    if (set.size >= maxPendingPerIp) {
      const oldest = set.values().next().value as Duplex;
      unpend(oldest);
      warnThrottled(`accept:${key}`, { remoteAddress: ip, reason: 'too-many-connections' }, 'oldest connection without CONNECT closed');
      oldest.destroy();
    }
    if (allPending.size >= maxPendingTotal) {
      const oldest = allPending.keys().next().value as Duplex;
      unpend(oldest);
      warnThrottled(
        'accept:all',
        { remoteAddress: ip, reason: 'too-many-pending' },
        'oldest connection without CONNECT closed (every address together is at its cap)',
      );
      oldest.destroy();
    }
    pending.set(key, set);
    set.add(socket);
    allPending.set(socket, key);
  };

  /**
   * Raw sockets whose stream is not admitted yet (in a TLS handshake, or before a WebSocket upgrade), by peer
   * ("address:port"): they count as pending under their address too, so one address cannot fill `maxConnections`
   * with handshakes it never finishes. The stream admitted for the peer takes its place (`handOver`).
   */
  const early = new Map<string, net.Socket>();
  const holdEarly = (raw: net.Socket, ip: string): void => {
    if (!accepting) {
      raw.destroy();
      return;
    }
    hold(raw, ip);
    const peer = peerKey(raw);
    early.set(peer, raw);
    raw.once('close', () => {
      unpend(raw);
      if (early.get(peer) === raw) early.delete(peer);
    });
  };
  const handOver = (socket: net.Socket): void => {
    const peer = peerKey(socket);
    const raw = early.get(peer);
    if (raw === undefined) return;
    early.delete(peer);
    unpend(raw);
  };

  /** Counts, guards and throttles a new stream from `ip`, then hands it on. */
  const admit = (socket: Duplex, ip: string, transport: net.Socket): void => {
    if (!accepting) {
      socket.destroy();
      return;
    }
    handOver(transport);
    hold(socket, ip);
    socketIps.set(socket, ip);
    sockets.add(socket);
    socket.once('close', () => {
      sockets.delete(socket);
      unpend(socket);
    });
    guardSocket(socket, maxPacketBytes, (rejection) => {
      log.warn(
        { clientId: clientOfSocket(socket)?.id ?? null, topic: undefined, remoteAddress: ip, ...rejection },
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
    options.handle(socket, transport);
  };
  /** Raw sockets still in their TLS handshake: closed with the server. */
  const handshaking = new Set<net.Socket>();
  let server: net.Server;
  if (options.tls) {
    // Node checks a client certificate only after the handshake and then closes the socket without an alert, which a
    // client cannot tell from a network failure. So the check is made here instead: a client whose certificate the CA
    // did not sign (or that sent none) gets its CONNECT answered with CONNACK 5, "not authorized", and is closed.
    const requireClientCert = options.tls.requestCert === true;
    const secure = tls.createServer(
      { ...options.tls, rejectUnauthorized: false, noDelay: true, handshakeTimeout: options.handshakeTimeoutMs ?? 10_000 },
      (socket: tls.TLSSocket) => {
        socket.setNoDelay(true);
        if (requireClientCert && !socket.authorized) {
          const ip = realAddress(socket);
          warnThrottled(
            `tls-cert:${ip}`,
            { remoteAddress: ip, reason: 'client-certificate', code: 'MESH_UNAUTHORIZED', tlsError: String(socket.authorizationError) },
            'client certificate refused',
          );
          socket.setTimeout(options.handshakeTimeoutMs ?? 10_000, () => socket.destroy());
          socket.once('data', () => socket.end(CONNACK_NOT_AUTHORIZED));
          socket.on('error', () => {});
          return;
        }
        accept(socket);
      },
    );
    secure.on('connection', (raw: net.Socket) => {
      handshaking.add(raw);
      raw.once('close', () => handshaking.delete(raw));
      holdEarly(raw, realAddress(raw));
    });
    secure.on('tlsClientError', (err: Error & { code?: string }, socket: tls.TLSSocket) => {
      const ip = realAddress(socket);
      warnThrottled(
        `tls:${ip}`,
        { remoteAddress: ip, reason: 'tls', code: 'MESH_TLS', tlsError: err.code ?? err.message },
        'TLS handshake failed',
      );
      // Node closes the socket itself once the alert that tells the client why has gone out.
    });
    server = secure;
  } else {
    server = net.createServer({ noDelay: true }, accept);
  }
  /** Sockets still sending their PROXY header: closed with the server. */
  const awaitingHeader = new Set<net.Socket>();
  if (options.proxyProtocol) {
    // The balancer's connection arrives on an outer server, which reads the header and then hands the socket to the
    // TLS or plain server as if it had just connected; the bytes read past the header are pushed back once the guard
    // and the byte limit are in place, so they see every byte of the client's stream.
    const inner = server;
    const timeoutMs = options.handshakeTimeoutMs ?? 10_000;
    server = net.createServer({ noDelay: true }, (socket) => {
      if (!accepting) {
        socket.destroy();
        return;
      }
      const key = peerKey(socket);
      awaitingHeader.add(socket);
      socket.on('error', () => {});
      readProxyHeader(socket, timeoutMs).then(
        ({ address, rest }) => {
          awaitingHeader.delete(socket);
          if (socket.destroyed) return;
          if (address !== undefined) {
            proxied.set(key, address);
            socket.once('close', () => proxied.delete(key));
          }
          inner.emit('connection', socket);
          if (rest.length > 0) socket.push(rest);
        },
        (err: Error & { code?: string }) => {
          awaitingHeader.delete(socket);
          warnThrottled(
            `proxy:${socket.remoteAddress}`,
            { remoteAddress: socket.remoteAddress, reason: 'proxy-protocol', code: err.code, error: err.message },
            'connection without a valid PROXY header closed',
          );
          socket.destroy();
        },
      );
    });
  }
  server.maxConnections = options.maxConnections;
  server.on('drop', (data) =>
    warnThrottled('drop', { remoteAddress: data?.remoteAddress, reason: 'max-connections' }, 'connection dropped'),
  );

  let ws: { server: http.Server; wss: WebSocketServer } | undefined;
  const startWs = (): { server: http.Server; wss: WebSocketServer } => {
    const path = options.wsPath ?? '/mqtt';
    const requireClientCert = options.tls?.requestCert === true;
    const web = options.tls
      ? https.createServer({ ...options.tls, rejectUnauthorized: false, handshakeTimeout: options.handshakeTimeoutMs ?? 10_000 })
      : http.createServer();
    web.maxConnections = options.maxConnections;
    web.on('connection', (raw: net.Socket) => holdEarly(raw, raw.remoteAddress ?? 'unknown'));
    web.headersTimeout = options.handshakeTimeoutMs ?? 10_000;
    web.requestTimeout = options.handshakeTimeoutMs ?? 10_000;
    // Plain HTTP on the WebSocket port gets a short answer saying what the port is for.
    web.on('request', (_req, res) => {
      res.writeHead(426, { 'content-type': 'text/plain', upgrade: 'websocket' });
      res.end(`MQTT over WebSocket: open a WebSocket at ${path} with the "mqtt" subprotocol\n`);
    });
    const wss = new WebSocketServer({
      server: web,
      path,
      // One MQTT packet per frame at most, as MQTT over WebSocket clients send it; larger frames are refused by ws.
      maxPayload: maxPacketBytes,
      perMessageDeflate: false,
      handleProtocols: (protocols) => (protocols.has('mqtt') ? 'mqtt' : protocols.has('mqttv3.1') ? 'mqttv3.1' : false),
    });
    wss.on('connection', (socket, req) => {
      const raw = req.socket as net.Socket;
      raw.setNoDelay(true);
      const ip = raw.remoteAddress ?? 'unknown';
      if (requireClientCert && !(raw as tls.TLSSocket).authorized) {
        warnThrottled(
          `tls-cert:${ip}`,
          { remoteAddress: ip, reason: 'client-certificate', code: 'MESH_UNAUTHORIZED', transport: 'websocket' },
          'client certificate refused',
        );
        socket.close(1008, 'client certificate required');
        return;
      }
      const stream = createWebSocketStream(socket);
      stream.on('error', () => {});
      admit(stream, ip, raw);
    });
    wss.on('error', (err) => log.error({ err }, 'websocket server error'));
    return { server: web, wss };
  };

  return {
    server,
    scheme: options.tls ? 'mqtts' : 'mqtt',
    wsScheme: options.tls ? 'wss' : 'ws',
    async listenWs(port, host) {
      ws ??= startWs();
      const web = ws.server;
      await new Promise<void>((resolve, reject) => {
        web.once('error', reject);
        web.listen(port, host, () => {
          web.off('error', reject);
          resolve();
        });
      });
      web.on('error', (err) => log.error({ err }, 'websocket port error'));
      return (web.address() as net.AddressInfo).port;
    },
    addressOf: (socket) => (socket !== null && typeof socket === 'object' ? socketIps.get(socket) : undefined),
    established(socket) {
      if (socket !== null && typeof socket === 'object') unpend(socket as Duplex);
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
      const wsClosed = ws
        ? new Promise<void>((resolve) => {
            ws!.wss.close();
            ws!.server.close(() => resolve());
            ws!.server.closeAllConnections();
          })
        : Promise.resolve();
      for (const socket of sockets) socket.destroy();
      for (const socket of handshaking) socket.destroy();
      for (const socket of awaitingHeader) socket.destroy();
      await Promise.all([closed, wsClosed]);
    },
  };
}
