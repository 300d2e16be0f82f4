/**
 * Shared fixtures for the broker tests (broker, broker-auth, hostile): reverse-order cleanup, a broker on port 0 whose
 * log lines are captured, admitted identities, mqtt.js clients, and raw TCP sockets speaking hand-made MQTT 3.1.1.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { type BrokerHandle, type BrokerOptions, startBroker } from '@edge-mesh/broker';
import { admit, generateIdentity, type Identity, makeConnectToken, type Role, topics } from '@edge-mesh/protocol';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { pino } from 'pino';

// ── cleanup, logs, temp folders ────────────────────────────────────────────────────────────────────────────────

export type Defer = (fn: () => unknown) => void;

/** t.after runs hooks in registration order; this runs them last-registered first. */
export function cleanup(t: TestContext): Defer {
  const stack: (() => unknown)[] = [];
  t.after(async () => {
    while (stack.length > 0) await stack.pop()!();
  });
  return (fn) => void stack.push(fn);
}

export interface LogLine {
  level: number;
  msg: string;
  clientId?: string | null;
  topic?: string;
  reason?: string;
  [key: string]: unknown;
}

/** A debug-level pino logger whose lines are parsed into `logs`. */
export function captureLogs() {
  const logs: LogLine[] = [];
  const logger = pino({ level: 'debug' }, { write: (line: string) => void logs.push(JSON.parse(line) as LogLine) });
  return { logs, logger };
}

/** A fresh folder named `<prefix>…` in the system temp folder, removed at cleanup. */
export async function tempDir(defer: Defer, prefix: string): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix));
  defer(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

export async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<T>((_, reject) => (timer = setTimeout(() => reject(new Error(`timeout: ${what}`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

// ── brokers and identities ─────────────────────────────────────────────────────────────────────────────────────

/** A broker on port 0 logging at debug into `logs`, closed at cleanup. */
export async function loggedBroker(defer: Defer, options: BrokerOptions = {}): Promise<{ b: BrokerHandle; logs: LogLine[] }> {
  const { logs, logger } = captureLogs();
  const b = await startBroker({ port: 0, logger, ...options });
  defer(() => b.close());
  return { b, logs };
}

export interface AuthBroker {
  b: BrokerHandle;
  logs: LogLine[];
  op: Identity;
  dataDir: string;
}

export type AuthBrokerOptions = BrokerOptions & { op?: Identity; dataDir?: string };

/**
 * A test file's `authBroker(defer, options)`: an authenticated broker with one trusted operator (a fresh one unless
 * `op` is given) and its admission store in `dataDir` (a fresh temp folder named `<prefix>…` unless given).
 * `defaults` go under each call's options.
 */
export function authBrokerFor(prefix: string, defaults: BrokerOptions = {}) {
  return async (defer: Defer, options: AuthBrokerOptions = {}): Promise<AuthBroker> => {
    const { op = generateIdentity('operator'), dataDir = await tempDir(defer, prefix), ...rest } = options;
    const { b, logs } = await loggedBroker(defer, {
      ...defaults,
      auth: { trustedOperators: [{ id: op.id, publicKey: op.publicKey }], dataDir },
      ...rest,
    });
    return { b, logs, op, dataDir };
  };
}

/** A fresh identity in `role`, admitted by the broker's operator. */
export async function admitted(ab: AuthBroker, role: Role): Promise<Identity> {
  const who = generateIdentity(role);
  await ab.b.admit(admit(ab.op, who));
  return who;
}

// ── mqtt.js clients ────────────────────────────────────────────────────────────────────────────────────────────

export const CLIENT_DEFAULTS = { protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 2000 } as const satisfies IClientOptions;

/** Client options for `who`: an identity proves itself with a fresh token; a plain id connects anonymously. */
export function options(who: Identity | string, extra: IClientOptions = {}): IClientOptions {
  const credentials = typeof who === 'string' ? { clientId: who } : { clientId: who.id, username: who.id, password: makeConnectToken(who) };
  return { ...CLIENT_DEFAULTS, ...credentials, ...extra };
}

/** A connected mqtt.js client (TCP_NODELAY on), ended at cleanup. */
export async function connect(defer: Defer, b: BrokerHandle, who: Identity | string, extra: IClientOptions = {}): Promise<MqttClient> {
  const c = await mqtt.connectAsync(b.url, options(who, extra));
  (c.stream as net.Socket).setNoDelay(true);
  defer(() => c.endAsync(true));
  return c;
}

export function nextMessage(c: MqttClient, timeoutMs = 2000): Promise<{ topic: string; payload: Buffer; qos: number; retain: boolean }> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      c.off('message', onMessage);
      reject(new Error('no message within timeout'));
    }, timeoutMs);
    function onMessage(topic: string, payload: Buffer, packet: mqtt.IPublishPacket): void {
      clearTimeout(timer);
      c.off('message', onMessage);
      resolve({ topic, payload, qos: packet.qos, retain: packet.retain });
    }
    c.on('message', onMessage);
  });
}

/** Collects messages for a while (to show something did *not* arrive). */
export async function messagesDuring(c: MqttClient, ms: number): Promise<{ topic: string; retain: boolean; payload: string }[]> {
  const seen: { topic: string; retain: boolean; payload: string }[] = [];
  const onMessage = (topic: string, payload: Buffer, packet: mqtt.IPublishPacket): void => {
    seen.push({ topic, retain: packet.retain, payload: payload.toString() });
  };
  c.on('message', onMessage);
  await new Promise((r) => setTimeout(r, ms));
  c.off('message', onMessage);
  return seen;
}

/** Resolves with the time the client's connection closed (now, if it already has). */
export function waitClose(c: MqttClient, timeoutMs = 2000): Promise<number> {
  if (c.disconnected && !c.connected) return Promise.resolve(Date.now());
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('client was not disconnected')), timeoutMs);
    c.once('close', () => {
      clearTimeout(timer);
      resolve(Date.now());
    });
  });
}

/**
 * SUBSCRIBE and return the granted QoS per filter, in order (a list of filters subscribes each at QoS 1). mqtt.js
 * rejects when any filter gets 0x80, so the SUBACK is read from the error in that case.
 */
export async function grantedQoS(c: MqttClient, subs: string[] | Record<string, { qos: 0 | 1 | 2 }>): Promise<Record<string, number>> {
  const bySub = Array.isArray(subs) ? Object.fromEntries(subs.map((f) => [f, { qos: 1 as const }])) : subs;
  let granted: number[];
  try {
    granted = (await c.subscribeAsync(bySub)).map((g) => g.qos);
  } catch (err) {
    const packet = (err as { packet?: { granted?: number[] } }).packet;
    if (!packet?.granted) throw err;
    granted = packet.granted;
  }
  const filters = Object.keys(bySub);
  assert.equal(granted.length, filters.length);
  return Object.fromEntries(filters.map((f, i) => [f, granted[i]!]));
}

/**
 * A fresh admitted app (from 127.0.0.1) sends a request to a fresh admitted agent and gets its reply: the broker
 * serves. With `withinMs`, each message must arrive within it, the whole round trip (admissions and connects
 * included) must take less, and the pair disconnects afterwards.
 */
export async function assertServing(defer: Defer, ab: AuthBroker, withinMs?: number): Promise<void> {
  const t0 = Date.now();
  const agentId = await admitted(ab, 'agent');
  const appId = await admitted(ab, 'app');
  const agent = await connect(defer, ab.b, agentId);
  const app = await connect(defer, ab.b, appId);
  await agent.subscribeAsync(topics.agentRequestsFor(agentId.id), { qos: 1 });
  await app.subscribeAsync(topics.clientRepliesFor(appId.id), { qos: 1 });
  const req = nextMessage(agent, withinMs);
  await app.publishAsync(topics.agentRequest(agentId.id, appId.id), 'ping', { qos: 1 });
  assert.equal((await req).payload.toString(), 'ping');
  const res = nextMessage(app, withinMs);
  await agent.publishAsync(topics.clientReply(appId.id, agentId.id), 'pong', { qos: 1 });
  const m = await res;
  assert.equal(m.topic, topics.clientReply(appId.id, agentId.id));
  assert.equal(m.payload.toString(), 'pong');
  if (withinMs === undefined) return;
  assert.ok(Date.now() - t0 < withinMs, `round trip took ${Date.now() - t0} ms`);
  await agent.endAsync();
  await app.endAsync();
}

// ── raw MQTT 3.1.1 over TCP ────────────────────────────────────────────────────────────────────────────────────

function varint(n: number): Buffer {
  const out: number[] = [];
  do {
    let byte = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) byte |= 0x80;
    out.push(byte);
  } while (n > 0);
  return Buffer.from(out);
}

export function frame(firstByte: number, body: Buffer): Buffer {
  return Buffer.concat([Buffer.from([firstByte]), varint(body.length), body]);
}

/** A length-prefixed MQTT string. */
export function str(s: string | Buffer): Buffer {
  const b = typeof s === 'string' ? Buffer.from(s, 'utf8') : s;
  return Buffer.concat([Buffer.from([b.length >> 8, b.length & 0xff]), b]);
}

export interface ConnectFields {
  clientId: string;
  username?: string | Buffer;
  password?: Buffer;
  clean?: boolean;
  keepalive?: number;
  protocolName?: string;
  level?: number;
  extraFlags?: number;
}

/** A CONNECT: clean session, keepalive 30, MQTT 3.1.1 unless `f` says otherwise. */
export function connectPacket(f: ConnectFields): Buffer {
  let flags = ((f.clean ?? true) ? 0x02 : 0) | (f.extraFlags ?? 0);
  if (f.username !== undefined) flags |= 0x80;
  if (f.password !== undefined) flags |= 0x40;
  const keepalive = f.keepalive ?? 30;
  const parts = [str(f.protocolName ?? 'MQTT'), Buffer.from([f.level ?? 4, flags, keepalive >> 8, keepalive & 0xff]), str(f.clientId)];
  if (f.username !== undefined) parts.push(str(f.username));
  if (f.password !== undefined) parts.push(str(f.password));
  return frame(0x10, Buffer.concat(parts));
}

export interface Raw {
  socket: net.Socket;
  received: Buffer[];
  closed: Promise<number>;
  isClosed: () => boolean;
  bytes: () => Buffer;
}

/** A raw TCP socket (from `localAddress` if given) that records what it receives and when it closes. */
export async function rawSocket(defer: Defer, b: BrokerHandle, localAddress?: string): Promise<Raw> {
  const socket = net.connect({ port: b.port, host: '127.0.0.1', ...(localAddress ? { localAddress } : {}) });
  socket.on('error', () => {});
  defer(() => socket.destroy());
  const received: Buffer[] = [];
  socket.on('data', (d: Buffer) => received.push(d));
  let isClosed = false;
  const closed = new Promise<number>((resolve) =>
    socket.once('close', () => {
      isClosed = true;
      resolve(Date.now());
    }),
  );
  await Promise.race([once(socket, 'connect'), closed]);
  return { socket, received, closed, isClosed: () => isClosed, bytes: () => Buffer.concat(received) };
}
