/**
 * Hostile input against the authenticated broker (docs/security.md, "Hostile input"), for the cases
 * test/broker.test.ts does not already cover. Every case checks its own outcome and then that the broker still serves a
 * well-behaved pair of clients (an admitted app and agent exchanging a request and a reply).
 *
 * Attackers that must be told apart from the well-behaved clients by address connect from 127.0.0.2-127.0.0.9 (all
 * of 127/8 is loopback on Linux); the well-behaved clients use 127.0.0.1.
 */
import assert from 'node:assert/strict';
import type { Duplex } from 'node:stream';
import test from 'node:test';
import { startBroker } from '@edge-mesh/broker';
import { addressGroup } from '@edge-mesh/client';
import { generateIdentity, type Identity, MeshError, makeConnectToken, topics } from '@edge-mesh/protocol';
import mqtt from 'mqtt';
import { resolveBrokerOptions } from '../broker/src/options.ts';
import {
  admitted,
  assertServing,
  authBrokerFor,
  type ConnectFields,
  cleanup,
  connect,
  connectPacket,
  frame,
  grantedQoS,
  nextMessage,
  options,
  type Raw,
  rawSocket,
  str,
  waitClose,
  withTimeout,
} from './broker-fixtures.ts';
import { waitFor } from './helpers.ts';

// ── helpers ────────────────────────────────────────────────────────────────────────────────────────────────────

const authBroker = authBrokerFor('hostile-');

/** A CONNECT that proves `who` (fresh token). */
function authConnect(who: Identity, extra: Partial<ConnectFields> = {}): Buffer {
  return connectPacket({ clientId: who.id, username: who.id, password: makeConnectToken(who), ...extra });
}

function publishPacket(topic: string | Buffer, payload: Buffer | string, qos = 0, messageId = 1): Buffer {
  const parts = [str(topic)];
  if (qos > 0) parts.push(Buffer.from([messageId >> 8, messageId & 0xff]));
  parts.push(typeof payload === 'string' ? Buffer.from(payload) : payload);
  return frame(0x30 | (qos << 1), Buffer.concat(parts));
}

function subscribePacket(filter: string | Buffer, qos = 1, messageId = 1): Buffer {
  return frame(0x82, Buffer.concat([Buffer.from([messageId >> 8, messageId & 0xff]), str(filter), Buffer.from([qos])]));
}

/** Waits until `n` bytes arrived or the socket closed; returns what arrived. */
async function readBytes(raw: Raw, n: number, timeoutMs = 2000): Promise<Buffer> {
  const deadline = Date.now() + timeoutMs;
  while (raw.bytes().length < n && !raw.isClosed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  return raw.bytes();
}

/** The CONNACK return code, or undefined when the socket closed without one. */
async function connackCode(raw: Raw, timeoutMs = 2000): Promise<number | undefined> {
  const b = await readBytes(raw, 4, timeoutMs);
  if (b.length < 4) return undefined;
  assert.equal(b[0], 0x20);
  return b[3];
}

// ── tests ──────────────────────────────────────────────────────────────────────────────────────────────────────

test('bad protocol names and versions (3.1, MQTT 5, others), reserved flag bits and QoS 3 are closed without a session', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const cases: [string, Buffer, number | undefined][] = [
    ['bad protocol name', authConnect(agent, { protocolName: 'MQXX' }), undefined],
    ['protocol level 2', authConnect(agent, { level: 2 }), undefined],
    ['protocol level 6', authConnect(agent, { level: 6 }), undefined],
    // MQTT 3.1 (or level 3 under the 3.1.1 name) is answered "unacceptable protocol version".
    ['MQTT 3.1', authConnect(agent, { protocolName: 'MQIsdp', level: 3 }), 1],
    ['level 3 named MQTT', authConnect(agent, { level: 3 }), 1],
    ['reserved CONNECT flag bit 0', authConnect(agent, { extraFlags: 0x01 }), undefined],
    ['reserved bits in the CONNECT fixed header', Buffer.concat([Buffer.from([0x11]), authConnect(agent).subarray(1)]), undefined],
    ['CONNECT declaring 256 MB', Buffer.from([0x10, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x04]), undefined],
  ];
  for (const [what, bytes, code] of cases) {
    const raw = await rawSocket(defer, ab.b);
    raw.socket.write(bytes);
    await withTimeout(raw.closed, 2000, what);
    const got = raw.bytes();
    if (code === undefined) assert.equal(got.length, 0, `${what}: nothing sent back`);
    else assert.deepEqual([...got], [0x20, 0x02, 0x00, code], what);
  }

  // A real MQTT 5 client (mqtt.js) is refused with "unacceptable protocol version".
  await assert.rejects(
    mqtt.connectAsync(ab.b.url, { ...options(agent), protocolVersion: 5 }),
    (err: Error & { code?: number }) => err.code === 1,
  );

  // After a good CONNECT: QoS 3, a SUBSCRIBE with wrong fixed-header flags, an MQTT 5 AUTH packet.
  const after: [string, Buffer][] = [
    ['QoS 3 PUBLISH', frame(0x36, Buffer.concat([str(topics.agentLoad(agent.id)), Buffer.from([0, 1]), Buffer.from('x')]))],
    ['SUBSCRIBE with flags 0', frame(0x80, Buffer.concat([Buffer.from([0, 1]), str(topics.agentRequestsFor(agent.id)), Buffer.from([1])]))],
    ['AUTH packet', Buffer.from([0xf0, 0x00])],
  ];
  for (const [what, bytes] of after) {
    const raw = await rawSocket(defer, ab.b);
    raw.socket.write(authConnect(agent));
    assert.equal(await connackCode(raw), 0, what);
    raw.socket.write(bytes);
    await withTimeout(raw.closed, 2000, what);
  }
  assert.equal(ab.b.clientCount(), 0);
  await assertServing(defer, ab, 2000);
});

test('a packet started and never completed after CONNECT is closed by the keepalive deadline', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const raw = await rawSocket(defer, ab.b);
  raw.socket.write(authConnect(agent, { keepalive: 1 }));
  assert.equal(await connackCode(raw), 0);
  // Half a PUBLISH: header and part of the topic, then silence.
  const half = publishPacket(topics.agentLoad(agent.id), Buffer.alloc(1000)).subarray(0, 20);
  raw.socket.write(half);
  const sentAt = Date.now();
  const closedAt = await withTimeout(raw.closed, 4000, 'keepalive close');
  assert.ok(closedAt - sentAt >= 1000 && closedAt - sentAt < 3000, `closed after ${closedAt - sentAt} ms`);
  await assertServing(defer, ab, 2000);
});

test('invalid UTF-8 and NUL in topics are refused (publish disconnects, subscribe gets 0x80)', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const me = agent.id;
  const status = Buffer.from(topics.agentStatus(me));
  const badUtf8 = Buffer.concat([status.subarray(0, 14), Buffer.from([0xff, 0xfe]), status.subarray(14)]);
  for (const [what, topic, reason] of [
    ['invalid UTF-8', badUtf8, 'invalid-utf8'],
    ['NUL', Buffer.concat([status, Buffer.from([0])]), 'nul-in-topic'],
  ] as const) {
    const raw = await rawSocket(defer, ab.b);
    raw.socket.write(authConnect(agent));
    assert.equal(await connackCode(raw), 0);
    raw.socket.write(publishPacket(topic, 'x', 1));
    await withTimeout(raw.closed, 2000, what);
    assert.equal(raw.bytes().length, 4, `${what}: no PUBACK`);
    assert.ok(
      ab.logs.some((l) => l.msg === 'publish refused' && l.reason === reason),
      reason,
    );
  }
  const raw = await rawSocket(defer, ab.b);
  raw.socket.write(authConnect(agent));
  assert.equal(await connackCode(raw), 0);
  const reqFilter = Buffer.from(topics.agentRequestsFor(me));
  raw.socket.write(subscribePacket(Buffer.concat([reqFilter.subarray(0, 10), Buffer.from([0xc3, 0x28]), reqFilter.subarray(10)]), 1, 7));
  const suback = (await readBytes(raw, 9)).subarray(4);
  assert.deepEqual([...suback], [0x90, 0x03, 0x00, 0x07, 0x80]);
  assert.ok(!raw.isClosed());
  await assertServing(defer, ab, 2000);
});

test('an empty topic and wildcards in a PUBLISH topic are refused before routing', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const load = topics.agentLoad(agent.id);
  for (const [what, topic] of [
    ['empty topic', ''],
    ['+ in a publish', load.replace('/load', '/+')],
    ['# in a publish', load.replace('/load', '/#')],
    ['+ as the id level', load.replace(agent.id, '+')],
  ] as const) {
    const raw = await rawSocket(defer, ab.b);
    raw.socket.write(authConnect(agent));
    assert.equal(await connackCode(raw), 0);
    raw.socket.write(publishPacket(Buffer.from(topic), 'x', 1));
    await withTimeout(raw.closed, 2000, what);
    assert.equal(raw.bytes().length, 4, `${what}: no PUBACK, only the CONNACK`);
  }
  await assertServing(defer, ab, 2000);
});

test('__proto__ and constructor as client id or topic level change nothing', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  for (const id of ['__proto__', 'constructor', 'agent-__proto__', 'hasOwnProperty']) {
    const raw = await rawSocket(defer, ab.b);
    raw.socket.write(connectPacket({ clientId: id, username: id, password: Buffer.alloc(88) }));
    assert.equal(await connackCode(raw), 2, id);
  }
  const app = await admitted(ab, 'app');
  const c = await connect(defer, ab.b, app);
  const granted = await c
    .subscribeAsync(['mesh/v1/client/__proto__/res/+', 'mesh/v1/agent/__proto__/status', '__proto__/#', 'constructor/prototype'], {
      qos: 1,
    })
    .catch((err: { packet?: { granted?: number[] } }) => err.packet?.granted?.map((qos) => ({ qos })));
  assert.deepEqual(
    granted?.map((g) => g.qos),
    [128, 128, 128, 128],
  );
  const closed = waitClose(c);
  c.publish(`mesh/v1/agent/__proto__/req/${app.id}`, 'x', { qos: 1 });
  await closed;
  assert.equal(({} as Record<string, unknown>).clientId, undefined, 'Object.prototype untouched');
  assert.equal(Object.getPrototypeOf({}), Object.prototype);

  // In open mode too: aedes keeps clients in a null-prototype map, and the topic level is just a string.
  const open = await startBroker({ port: 0 });
  defer(() => open.close());
  const proto = await mqtt.connectAsync(open.url, { protocolVersion: 4, clientId: '__proto__', reconnectPeriod: 0 });
  defer(() => proto.endAsync(true));
  await proto.subscribeAsync('__proto__/+', { qos: 1 });
  const got = nextMessage(proto);
  await proto.publishAsync('__proto__/constructor', 'y', { qos: 1 });
  assert.equal((await got).topic, '__proto__/constructor');
  assert.equal(open.clientCount(), 1);
  await assertServing(defer, ab, 2000);
});

test('retained floods: unique topics are refused, repeated own status keeps one retained message', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  // The first retained publish on a topic that is not the agent's own status costs its connection.
  const c = await connect(defer, ab.b, agent);
  const closed = waitClose(c);
  for (let i = 0; i < 200; i++) c.publish(`mesh/v1/agent/${agent.id}/status-${i}`, 'x', { qos: 0, retain: true });
  await closed;
  // 500 retained updates of its own status: the store holds one message, the last.
  const d = await connect(defer, ab.b, agent);
  for (let i = 0; i < 500; i++) d.publish(topics.agentStatus(agent.id), `v${i}`, { qos: 0, retain: true });
  await d.publishAsync(topics.agentStatus(agent.id), 'last', { qos: 1, retain: true });
  const router = await connect(defer, ab.b, await admitted(ab, 'router'));
  const seen: string[] = [];
  router.on('message', (topic, payload, packet) => packet.retain && seen.push(`${topic}=${payload.toString()}`));
  await router.subscribeAsync([topics.allAgentStatus(), topics.allAgentLoad()], { qos: 1 });
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(seen, [`${topics.agentStatus(agent.id)}=last`]);
  await assertServing(defer, ab, 2000);
});

test('QoS 2 is refused in authenticated mode too: publisher disconnected, nothing delivered', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agentId = await admitted(ab, 'agent');
  const agent = await connect(defer, ab.b, agentId);
  const granted = await agent.subscribeAsync(topics.agentRequestsFor(agentId.id), { qos: 2 });
  assert.equal(granted[0]?.qos, 1, 'a QoS 2 subscription is granted QoS 1');
  const seen: string[] = [];
  agent.on('message', (topic) => seen.push(topic));
  const appId = await admitted(ab, 'app');
  // Raw, so the broker's answer (no PUBREC, a close) is visible.
  const raw = await rawSocket(defer, ab.b);
  raw.socket.write(authConnect(appId));
  assert.equal(await connackCode(raw), 0);
  raw.socket.write(publishPacket(topics.agentRequest(agentId.id, appId.id), 'qos2', 2, 9));
  await withTimeout(raw.closed, 2000, 'QoS 2 close');
  assert.equal(raw.bytes().length, 4, 'no PUBREC');
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(seen, []);
  assert.ok(ab.logs.some((l) => l.reason === 'qos2' && l.clientId === appId.id));
  await assertServing(defer, ab, 2000);
});

test('idle-socket flood: one address gets at most maxConnectionsPerIp sockets, idle ones close at the connect timeout', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer, { maxConnectionsPerIp: 10, maxConnections: 100, connectTimeoutMs: 600 });
  const flood: Raw[] = [];
  for (let i = 0; i < 40; i++) flood.push(await rawSocket(defer, ab.b, '127.0.0.2'));
  await new Promise((r) => setTimeout(r, 100));
  const open = flood.filter((r) => !r.isClosed());
  assert.equal(open.length, 10, 'only the per-address cap is kept open');
  // Meanwhile a client from another address connects and is served.
  await assertServing(defer, ab, 2000);
  // The idle ones are closed by the CONNECT deadline, which frees the address again.
  await withTimeout(Promise.all(open.map((r) => r.closed)), 2000, 'idle sockets closed');
  const later = await rawSocket(defer, ab.b, '127.0.0.2');
  await new Promise((r) => setTimeout(r, 50));
  assert.ok(!later.isClosed());
  assert.ok(ab.logs.some((l) => l.reason === 'too-many-connections' && l.remoteAddress === '127.0.0.2'));
});

test('idle sockets from several addresses cannot fill the connection cap: the oldest of all make room, and a client still gets in', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  // Seven addresses × 5 idle sockets would fill a cap of 30 connections, and then every new socket would be refused
  // before any eviction could run.
  const ab = await authBroker(defer, { maxConnectionsPerIp: 5, maxConnections: 30, connectTimeoutMs: 10_000 });
  const flood: Raw[] = [];
  for (let a = 2; a <= 8; a++) for (let i = 0; i < 5; i++) flood.push(await rawSocket(defer, ab.b, `127.0.0.${a}`));
  await new Promise((r) => setTimeout(r, 100));
  assert.ok(flood.filter((r) => !r.isClosed()).length <= 15, 'at most half the cap is held by sockets without CONNECT');
  await assertServing(defer, ab, 2000);
  assert.ok(ab.logs.some((l) => l.reason === 'too-many-pending'));
});

test('the broker limits an IPv6 address by its /64, IPv4 whole, an IPv4-mapped address as its IPv4 address', () => {
  assert.equal(addressGroup('2001:db8:1:2:aaaa::1'), '2001:db8:1:2::/64');
  assert.equal(addressGroup('2001:db8:1:2:ffff:ffff:ffff:ffff'), '2001:db8:1:2::/64');
  assert.equal(addressGroup('2001:db8::1'), '2001:db8:0:0::/64');
  assert.equal(addressGroup('::1'), '0:0:0:0::/64');
  assert.equal(addressGroup('fe80::1%eth0'), 'fe80:0:0:0::/64');
  assert.equal(addressGroup('192.0.2.7'), '192.0.2.7');
  assert.equal(addressGroup('::ffff:192.0.2.7'), '192.0.2.7');
});

test('CONNECT storm: beyond the per-address bucket, CONNECTs naming no admitted id get CONNACK 3 before any check', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer, { connectBurstPerIp: 5, connectRatePerIp: 1, authFailuresBeforeBan: 1000 });
  const app = await admitted(ab, 'app');
  const storm: Raw[] = [];
  for (let i = 0; i < 30; i++) {
    const raw = await rawSocket(defer, ab.b, '127.0.0.3');
    raw.socket.write(authConnect(generateIdentity('app')));
    storm.push(raw);
  }
  const codes = await Promise.all(storm.map((r) => connackCode(r, 1000)));
  const checked = codes.filter((c) => c === 5).length;
  const limited = codes.filter((c) => c === 3).length;
  assert.ok(checked >= 5 && checked <= 8, `checked ${checked}`);
  assert.equal(checked + limited, 30);
  assert.ok(ab.logs.filter((l) => l.reason === 'not-admitted').length <= 8, 'the rest never reached the admission check');
  const warned = ab.logs.filter((l) => l.reason === 'connect-rate' && l.level === 40);
  assert.equal(warned.length, 1, 'the storm is logged once at warn, the rest at debug');
  // Valid credentials from the same address still get in (docs/security.md, "Connecting").
  const raw = await rawSocket(defer, ab.b, '127.0.0.3');
  raw.socket.write(authConnect(app));
  assert.equal(await connackCode(raw), 0);
  await assertServing(defer, ab, 2000);
});

test('unauthenticated-failure storm: an address is limited to admitted ids, others are unaffected, the limit ends', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer, { addressFailuresBeforeLimit: 5, authFailureWindowMs: 10_000, banMs: 1500 });
  const victim = await admitted(ab, 'agent');
  const stranger = generateIdentity('agent');
  for (let i = 0; i < 5; i++) {
    const raw = await rawSocket(defer, ab.b, '127.0.0.4');
    raw.socket.write(authConnect(stranger));
    assert.equal(await connackCode(raw), 5);
  }
  assert.ok(ab.logs.some((l) => l.msg === 'address limited' && l.remoteAddress === '127.0.0.4'));
  const refusalsBefore = ab.logs.filter((l) => l.reason === 'not-admitted').length;
  // Limited: CONNECTs naming no admitted id are answered CONNACK 3 without the admission check's refusal…
  for (let i = 0; i < 20; i++) {
    const raw = await rawSocket(defer, ab.b, '127.0.0.4');
    raw.socket.write(authConnect(stranger));
    assert.equal(await connackCode(raw), 3);
  }
  assert.equal(ab.logs.filter((l) => l.reason === 'not-admitted').length, refusalsBefore, 'limited CONNECTs were not checked further');
  // …while an admitted id from the same address gets in.
  const good = await rawSocket(defer, ab.b, '127.0.0.4');
  good.socket.write(authConnect(victim));
  assert.equal(await connackCode(good), 0);
  // Another address is served meanwhile.
  await assertServing(defer, ab, 2000);
  const limitedAt = ab.logs.find((l) => l.msg === 'address limited')!.time as number;
  await new Promise((r) => setTimeout(r, Math.max(0, limitedAt + 1600 - Date.now())));
  const raw = await rawSocket(defer, ab.b, '127.0.0.4');
  raw.socket.write(authConnect(stranger));
  assert.equal(await connackCode(raw), 5, 'the limit has ended: checked and refused as usual');
});

test('a frozen consumer is disconnected within drainTimeout and does not stall anyone else', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer, { drainTimeoutMs: 500 });
  const agentId = await admitted(ab, 'agent');
  const frozenId = await admitted(ab, 'app');
  const raw = await rawSocket(defer, ab.b);
  raw.socket.write(authConnect(frozenId));
  assert.equal(await connackCode(raw), 0);
  raw.socket.write(subscribePacket(topics.clientRepliesFor(frozenId.id), 0, 1));
  await readBytes(raw, 9);
  raw.socket.pause(); // never reads again: the kernel buffers fill, then the broker's writes stall

  let disconnectedAt = 0;
  ab.b.aedes.on('clientDisconnect', (c) => {
    if (c.id === frozenId.id) disconnectedAt = Date.now();
  });
  const agent = await connect(defer, ab.b, agentId);
  const chunk = Buffer.alloc(256 * 1024, 1);
  const t0 = Date.now();
  for (let i = 0; i < 96; i++) agent.publish(topics.clientReply(frozenId.id, agentId.id), chunk, { qos: 0 });
  // Others keep being served while (and after) the frozen one is dealt with.
  await assertServing(defer, ab, 3000);
  await withTimeout(
    (async () => {
      while (!disconnectedAt) await new Promise((r) => setTimeout(r, 20));
    })(),
    4000,
    'frozen consumer disconnected',
  );
  assert.ok(disconnectedAt - t0 < 3000, `disconnected after ${disconnectedAt - t0} ms`);
  assert.ok(agent.connected, 'the publisher was not punished');
  await assertServing(defer, ab, 2000);
});

test("a subscriber that stops reading the fleet's load reports does not stall the broker for anyone else", {
  timeout: 30_000,
}, async (t) => {
  // aedes runs at most 100 deliveries at once for the whole broker and finishes one only when the subscriber's
  // socket drains: more than 100 messages for a reader that has stopped would hold every slot for drainTimeoutMs.
  const defer = cleanup(t);
  const ab = await authBroker(defer, { drainTimeoutMs: 5_000 });
  const agentId = await admitted(ab, 'agent');
  const readerId = await admitted(ab, 'app');
  const raw = await rawSocket(defer, ab.b);
  raw.socket.write(authConnect(readerId));
  assert.equal(await connackCode(raw), 0);
  raw.socket.write(subscribePacket(topics.allAgentLoad(), 0, 1));
  await readBytes(raw, 5);
  raw.socket.pause();
  let disconnectedAt = 0;
  ab.b.aedes.on('clientDisconnect', (c) => {
    if (c.id === readerId.id) disconnectedAt = Date.now();
  });
  const agent = await connect(defer, ab.b, agentId);
  const big = Buffer.alloc(256 * 1024, 1);
  // The agent's load reports, big and small, and at both QoS: a load report sent at QoS 1 to a QoS 0 subscription
  // must not wait either.
  for (let i = 0; i < 40; i++) agent.publish(topics.agentLoad(agentId.id), big, { qos: 0 });
  for (let i = 0; i < 150; i++) agent.publish(topics.agentLoad(agentId.id), Buffer.from('x'), { qos: (i % 2) as 0 | 1 });
  await new Promise((r) => setTimeout(r, 500));
  await assertServing(defer, ab, 500);
  // And the reader that never drains is still disconnected in time.
  await withTimeout(
    (async () => {
      while (!disconnectedAt) await new Promise((r) => setTimeout(r, 50));
    })(),
    8_000,
    'the stopped reader disconnected',
  );
  assert.ok(agent.connected, 'the publisher was not punished');
  await assertServing(defer, ab, 500);
});

/** A raw client subscribed to every agent's status (QoS 1) and to its own replies (QoS 0), reading until paused. */
async function statusReader(
  defer: Parameters<typeof rawSocket>[0],
  ab: { b: Parameters<typeof rawSocket>[1] },
  id: Identity,
): Promise<Raw> {
  const raw = await rawSocket(defer, ab.b);
  raw.socket.write(authConnect(id));
  assert.equal(await connackCode(raw), 0);
  raw.socket.write(subscribePacket(topics.allAgentStatus(), 1, 1));
  raw.socket.write(subscribePacket(topics.clientRepliesFor(id.id), 0, 2));
  await readBytes(raw, 14);
  return raw;
}

test('readers that stop reading statuses, which are not dropped, are cut off before they hold the delivery slots', {
  timeout: 30_000,
}, async (t) => {
  // Statuses are state and still go, at QoS 1, to a subscriber whose socket does not drain; each holds one of the
  // broker's 100 delivery slots until it drains. Three readers that stop, sent 120 statuses, once held them all for
  // the drain timeout and stalled everyone (a request and its reply: "no message within timeout").
  const defer = cleanup(t);
  const ab = await authBroker(defer, { drainTimeoutMs: 10_000, publishRatePerClient: 10_000, publishBurstPerClient: 10_000 });
  const agentId = await admitted(ab, 'agent');
  const readers = [await admitted(ab, 'app'), await admitted(ab, 'app'), await admitted(ab, 'app')];
  const disconnectedAt = new Map<string, number>();
  ab.b.aedes.on('clientDisconnect', (c) => disconnectedAt.set(c.id, Date.now()));
  for (const readerId of readers) (await statusReader(defer, ab, readerId)).socket.pause();
  const agent = await connect(defer, ab.b, agentId);
  // Big load reports fill the readers' socket buffers first (dropped for them once they stop draining).
  await agent.subscribeAsync(topics.agentRequestsFor(agentId.id), { qos: 1 });
  const big = Buffer.alloc(256 * 1024, 1);
  for (const readerId of readers) {
    for (let i = 0; i < 40; i++) agent.publish(topics.clientReply(readerId.id, agentId.id), big, { qos: 0 });
  }
  await new Promise((r) => setTimeout(r, 300));
  const sent = Date.now();
  for (let i = 0; i < 120; i++) agent.publish(topics.agentStatus(agentId.id), Buffer.from(`s${i}`), { qos: 1, retain: true });
  await new Promise((r) => setTimeout(r, 300));
  await assertServing(defer, ab, 1000);
  for (const readerId of readers) {
    const at = disconnectedAt.get(readerId.id);
    assert.ok(
      at !== undefined && at - sent < 3_000,
      `reader ${readerId.id} cut off ${at === undefined ? 'never' : `${at - sent} ms`} after the statuses`,
    );
  }
  assert.ok(ab.logs.some((l) => l.reason === 'slow-consumer' && typeof l.held === 'number'));
  assert.ok(agent.connected, 'the publisher was not punished');
});

test('a subscriber that falls behind and catches up again, many times, keeps its connection and no listeners pile up on it', {
  timeout: 30_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer, { drainTimeoutMs: 10_000, publishRatePerClient: 10_000, publishBurstPerClient: 10_000 });
  const agentId = await admitted(ab, 'agent');
  const readerId = await admitted(ab, 'app');
  const raw = await statusReader(defer, ab, readerId);
  const agent = await connect(defer, ab.b, agentId);
  const conn = () => (ab.b.aedes as unknown as { clients: Record<string, { conn: Duplex }> }).clients[readerId.id]!.conn;
  const big = Buffer.alloc(256 * 1024, 1);
  const closeListeners: number[] = [];
  for (let cycle = 0; cycle < 4; cycle++) {
    raw.socket.pause();
    for (let i = 0; i < 40; i++) agent.publish(topics.clientReply(readerId.id, agentId.id), big, { qos: 0 });
    await waitFor(() => conn().writableNeedDrain, 5_000, 'the reader fell behind');
    // A few statuses while it is behind: held, under the cap.
    for (let i = 0; i < 5; i++) agent.publish(topics.agentStatus(agentId.id), Buffer.from(`c${cycle}s${i}`), { qos: 1, retain: true });
    await new Promise((r) => setTimeout(r, 100));
    raw.socket.resume();
    await waitFor(() => !conn().writableNeedDrain, 5_000, 'the reader caught up');
    closeListeners.push(conn().listenerCount('close'));
  }
  assert.ok(!raw.isClosed(), 'still connected');
  assert.equal(new Set(closeListeners).size, 1, `close listeners after each cycle: ${closeListeners.join(', ')}`);
});

test('readers that stop holding the shared delivery slots get themselves cut off, not an honest subscriber briefly behind', {
  timeout: 30_000,
}, async (t) => {
  // Two readers that stop, sent 25 statuses, hold 50 deliveries together (each under the per-subscriber cap). An
  // honest subscriber that falls behind on large replies for a moment then has one QoS 1 reply held: the one to go
  // must be a reader holding the most, not the one holding a single delivery.
  const defer = cleanup(t);
  const ab = await authBroker(defer, { drainTimeoutMs: 10_000, publishRatePerClient: 10_000, publishBurstPerClient: 10_000 });
  const agentId = await admitted(ab, 'agent');
  const stoppers = [await admitted(ab, 'app'), await admitted(ab, 'app')];
  const honestId = await admitted(ab, 'app');
  const disconnected = new Set<string>();
  ab.b.aedes.on('clientDisconnect', (c) => disconnected.add(c.id));
  const agent = await connect(defer, ab.b, agentId);
  const conn = (id: string) => (ab.b.aedes as unknown as { clients: Record<string, { conn: Duplex }> }).clients[id]?.conn;
  const big = Buffer.alloc(256 * 1024, 1);
  for (const id of stoppers) {
    (await statusReader(defer, ab, id)).socket.pause();
    for (let i = 0; i < 40; i++) agent.publish(topics.clientReply(id.id, agentId.id), big, { qos: 0 });
    await waitFor(() => conn(id.id)?.writableNeedDrain === true, 5_000, 'the stopped reader fell behind');
  }
  for (let i = 0; i < 25; i++) agent.publish(topics.agentStatus(agentId.id), Buffer.from(`s${i}`), { qos: 1, retain: true });
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(disconnected.size, 0, 'under the caps, nobody is cut off yet');

  const honest = await rawSocket(defer, ab.b);
  honest.socket.write(authConnect(honestId));
  assert.equal(await connackCode(honest), 0);
  honest.socket.write(subscribePacket(topics.clientRepliesFor(honestId.id), 1, 1));
  await readBytes(honest, 9);
  honest.socket.pause();
  // From another agent: the first one's publishes wait on the deliveries held for the stopped readers.
  const otherId = await admitted(ab, 'agent');
  const other = await connect(defer, ab.b, otherId);
  for (let i = 0; i < 40; i++) other.publish(topics.clientReply(honestId.id, otherId.id), big, { qos: 0 });
  await waitFor(() => conn(honestId.id)?.writableNeedDrain === true, 5_000, 'the honest subscriber fell behind');
  other.publish(topics.clientReply(honestId.id, otherId.id), Buffer.from('the reply that matters'), { qos: 1 });
  await new Promise((r) => setTimeout(r, 300));
  honest.socket.resume();
  await waitFor(() => honest.bytes().includes(Buffer.from('the reply that matters')) || honest.isClosed(), 10_000, 'the reply');
  assert.ok(!honest.isClosed() && !disconnected.has(honestId.id), 'the honest subscriber keeps its connection');
  assert.ok(
    stoppers.some((s) => disconnected.has(s.id)),
    'a stopped reader holding the most deliveries is cut off instead',
  );
  await assertServing(defer, ab, 1000);
});

test('a publish flood from one client is cut off by its token bucket; the default bucket allows a benchmark burst', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer, { publishRatePerClient: 200, publishBurstPerClient: 100 });
  const agentId = await admitted(ab, 'agent');
  const agent = await connect(defer, ab.b, agentId);
  await agent.subscribeAsync(topics.agentRequestsFor(agentId.id), { qos: 1 });
  let delivered = 0;
  agent.on('message', () => delivered++);
  const flooderId = await admitted(ab, 'app');
  const flooder = await connect(defer, ab.b, flooderId);
  const closed = waitClose(flooder);
  for (let i = 0; i < 2000; i++) flooder.publish(topics.agentRequest(agentId.id, flooderId.id), 'x', { qos: 0 });
  await closed;
  await new Promise((r) => setTimeout(r, 100));
  assert.ok(delivered >= 100 && delivered < 400, `delivered ${delivered} of 2000`);
  assert.ok(ab.logs.some((l) => l.reason === 'publish-rate' && l.clientId === flooderId.id));
  await assertServing(defer, ab, 2000);

  // Defaults (20k/s, burst 40k): 10,000 back-to-back publishes go through untouched.
  const roomy = await authBroker(defer);
  const a2 = await admitted(roomy, 'agent');
  const sub = await connect(defer, roomy.b, a2);
  await sub.subscribeAsync(topics.agentRequestsFor(a2.id), { qos: 1 });
  let got = 0;
  const all = new Promise<void>((resolve) => sub.on('message', () => ++got === 10_000 && resolve()));
  const benchId = await admitted(roomy, 'app');
  const bench = await connect(defer, roomy.b, benchId);
  for (let i = 0; i < 9_999; i++) bench.publish(topics.agentRequest(a2.id, benchId.id), 'x', { qos: 0 });
  await bench.publishAsync(topics.agentRequest(a2.id, benchId.id), 'x', { qos: 0 });
  await withTimeout(all, 10_000, '10k messages');
  assert.ok(bench.connected);
});

test('clean=false sessions, keepalive 0 or above the limit are refused, also with random ids and in open mode', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  // (23 refusals from one address would otherwise trip the default auth-failure ban, tested on its own above.)
  const ab = await authBroker(defer, { authFailuresBeforeBan: 1000, addressFailuresBeforeLimit: 1000 });
  const agent = await admitted(ab, 'agent');
  const cases: [string, Buffer, number, string][] = [
    ['clean=false', authConnect(agent, { clean: false }), 5, 'persistent-session'],
    ['keepalive 0', authConnect(agent, { keepalive: 0 }), 5, 'keepalive-zero'],
    ['keepalive 3600', authConnect(agent, { keepalive: 3600 }), 5, 'keepalive-too-long'],
  ];
  for (const [what, bytes, code, reason] of cases) {
    const raw = await rawSocket(defer, ab.b);
    raw.socket.write(bytes);
    assert.equal(await connackCode(raw), code, what);
    await withTimeout(raw.closed, 1000, what);
    assert.equal(ab.logs.filter((l) => l.msg === 'connect refused').at(-1)?.reason, reason, what);
  }
  for (let i = 0; i < 20; i++) {
    const random = generateIdentity('app');
    const raw = await rawSocket(defer, ab.b);
    raw.socket.write(authConnect(random, { clean: false }));
    assert.equal(await connackCode(raw), 5);
  }

  const open = await startBroker({ port: 0, authFailuresBeforeBan: 1000, addressFailuresBeforeLimit: 1000 });
  defer(() => open.close());
  for (let i = 0; i < 20; i++) {
    await assert.rejects(
      mqtt.connectAsync(open.url, {
        protocolVersion: 4,
        clientId: `random-${i}-${Math.random().toString(36).slice(2)}`,
        clean: false,
        reconnectPeriod: 0,
        connectTimeout: 2000,
      }),
      (err: Error & { code?: number }) => err.code === 5,
    );
  }
  await assert.rejects(
    mqtt.connectAsync(open.url, { protocolVersion: 4, clientId: 'idle-forever', keepalive: 0, reconnectPeriod: 0, connectTimeout: 2000 }),
    (err: Error & { code?: number }) => err.code === 5,
  );
  assert.equal(open.clientCount(), 0);
  await assertServing(defer, ab, 2000);
});

test('64 KB client id, user name or password is refused at once, before any signature work', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const big = 'a'.repeat(64 * 1024 - 1);
  const cases: [string, Buffer, number, string][] = [
    ['client id', connectPacket({ clientId: big, username: agent.id, password: makeConnectToken(agent) }), 2, 'client-id-too-long'],
    ['user name', connectPacket({ clientId: agent.id, username: big, password: makeConnectToken(agent) }), 5, 'username-too-long'],
    [
      'password',
      connectPacket({ clientId: agent.id, username: agent.id, password: Buffer.alloc(64 * 1024 - 1, 1) }),
      5,
      'password-too-long',
    ],
    [
      'multi-byte user name',
      connectPacket({ clientId: agent.id, username: 'é'.repeat(33), password: makeConnectToken(agent) }),
      5,
      'username-too-long',
    ],
  ];
  for (const [what, bytes, code, reason] of cases) {
    const raw = await rawSocket(defer, ab.b);
    const t0 = Date.now();
    raw.socket.write(bytes);
    assert.equal(await connackCode(raw), code, what);
    assert.ok(Date.now() - t0 < 500, `${what}: ${Date.now() - t0} ms`);
    const line = ab.logs.filter((l) => l.msg === 'connect refused').at(-1);
    assert.equal(line?.reason, reason, what);
    assert.ok(JSON.stringify(line).length < 1000, `${what}: the log line does not carry the field`);
  }
  assert.equal(ab.b.clientCount(), 0);
  await assertServing(defer, ab, 2000);
});

test('a SUBSCRIBE of 20,000 distinct filters: the first maxSubscriptions (256) are granted, the rest get 0x80, unsubscribing frees room', {
  timeout: 30_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const appId = await admitted(ab, 'app');
  const app = await connect(defer, ab.b, appId);
  // One app once sent a 1.1 MB SUBSCRIBE of 20,000 statuses of made-up agents, each allowed by the ACL, and got them all.
  const status = (i: number) => topics.agentStatus(`agent-${String(i).padStart(26, '0')}`);
  const flood = Array.from({ length: 20_000 }, (_, i) => status(i));
  const floodAt = Date.now();
  const granted = Object.values(await grantedQoS(app, flood));
  // At warn once a second: at most one line per second the flood took, and one more.
  const warnBound = Math.ceil((Date.now() - floodAt) / 1000) + 1;
  assert.equal(granted.filter((q) => q === 1).length, 256, 'granted');
  assert.deepEqual(granted.slice(0, 256), Array(256).fill(1), 'the first 256, in order');
  assert.ok(app.connected, 'the connection stays up');
  const refusals = ab.logs.filter((l) => l.reason === 'too-many-subscriptions' && l.clientId === appId.id);
  assert.equal(refusals.length, 20_000 - 256, 'every refusal is logged');
  const warned = refusals.filter((l) => l.level === 40).length;
  assert.ok(warned >= 1 && warned <= warnBound, `${warned} of them at warn (at most ${warnBound}), the rest at debug`);
  assert.equal(refusals[0]!.code, 'MESH_TOO_LARGE');

  // A filter already held is granted again; an unsubscribed one frees its room for another.
  assert.deepEqual(await grantedQoS(app, [status(0), status(300)]), { [status(0)]: 1, [status(300)]: 128 });
  await app.unsubscribeAsync([status(0), status(1)]);
  assert.deepEqual(await grantedQoS(app, [status(300), status(301), status(302)]), {
    [status(300)]: 1,
    [status(301)]: 1,
    [status(302)]: 128,
  });
  assert.throws(
    () => resolveBrokerOptions({ maxSubscriptions: 0 }),
    (err: unknown) => err instanceof MeshError && /maxSubscriptions/.test(err.message),
  );
  assert.equal(resolveBrokerOptions({}).maxSubscriptions, 256);
  await assertServing(defer, ab, 2000);
});

test('a flood of MQTT 3.1 CONNECTs or unadmitted ids from one address: each answered, logged at warn about once a second', {
  timeout: 30_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const refusedFrom = (address: string) => ab.logs.filter((l) => l.msg === 'connect refused' && l.remoteAddress === address);
  // 300 MQTT 3.1 CONNECTs once wrote 300 warn lines.
  const versionsAt = Date.now();
  for (let i = 0; i < 300; i++) {
    const raw = await rawSocket(defer, ab.b, '127.0.0.5');
    raw.socket.write(authConnect(agent, { protocolName: 'MQIsdp', level: 3 }));
    assert.equal(await connackCode(raw), 1, `CONNECT ${i}`);
  }
  const versions = refusedFrom('127.0.0.5');
  assert.equal(versions.length, 300, 'each is logged');
  assert.ok(versions.every((l) => l.reason === 'protocol-version'));
  const warned = versions.filter((l) => l.level === 40).length;
  const versionsBound = Math.ceil((Date.now() - versionsAt) / 1000) + 1;
  assert.ok(warned >= 1 && warned <= versionsBound, `${warned} at warn (at most ${versionsBound})`);
  // Their failures limited the address (100 by default); from then on the limit is looked at first and says so.
  assert.ok(ab.logs.some((l) => l.msg === 'address limited' && l.remoteAddress === '127.0.0.5'));
  assert.equal(versions.at(-1)!.limited, 'address-limited');

  // Refused tokens: 60 unadmitted ids from another address (below its limit) are each checked and refused.
  const strangersAt = Date.now();
  for (let i = 0; i < 60; i++) {
    const raw = await rawSocket(defer, ab.b, '127.0.0.6');
    raw.socket.write(authConnect(generateIdentity('app')));
    assert.equal(await connackCode(raw), 5);
  }
  const strangers = refusedFrom('127.0.0.6');
  assert.equal(strangers.length, 60);
  assert.ok(strangers.every((l) => l.reason === 'not-admitted'));
  const warnedStrangers = strangers.filter((l) => l.level === 40).length;
  const strangersBound = Math.ceil((Date.now() - strangersAt) / 1000) + 1;
  assert.ok(warnedStrangers >= 1 && warnedStrangers <= strangersBound, `${warnedStrangers} at warn (at most ${strangersBound})`);
  await assertServing(defer, ab, 2000);
});
