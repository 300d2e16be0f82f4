/**
 * The embedded broker against real mqtt.js clients (MQTT 3.1.1) and raw TCP sockets for hostile input.
 * Every test starts its own broker on port 0 and tears everything down in reverse order.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import net from 'node:net';
import test from 'node:test';
import { type BrokerHandle, type BrokerOptions, startBroker } from '@edge-mesh/broker';
import { MeshError, topics } from '@edge-mesh/protocol';
import mqtt from 'mqtt';
import { PacketSizeGuard } from '../broker/src/guard.ts';
import {
  cleanup,
  connect,
  connectPacket,
  type Defer,
  grantedQoS,
  loggedBroker,
  messagesDuring,
  nextMessage,
  rawSocket,
  str,
  waitClose,
  withTimeout,
} from './broker-fixtures.ts';

// ── helpers ────────────────────────────────────────────────────────────────────────────────────────────────────

/** Round trip through the broker with a fresh pair of clients: proves it is still serving. */
async function assertServing(defer: Defer, b: BrokerHandle, tag: string): Promise<void> {
  const sub = await connect(defer, b, `probe-sub-${tag}`);
  const pub = await connect(defer, b, `probe-pub-${tag}`);
  const topic = `probe/${tag}`;
  const granted = await sub.subscribeAsync(topic, { qos: 1 });
  assert.equal(granted[0]?.qos, 1);
  const got = nextMessage(sub);
  await pub.publishAsync(topic, 'ping', { qos: 1 });
  assert.equal((await got).payload.toString(), 'ping');
}

const CONNACK_OK = Buffer.from([0x20, 0x02, 0x00, 0x00]);

async function rawConnected(defer: Defer, b: BrokerHandle, clientId: string) {
  const raw = await rawSocket(defer, b);
  raw.socket.write(connectPacket({ clientId, keepalive: 60 }));
  await withTimeout(
    (async () => {
      while (Buffer.concat(raw.received).length < 4) await once(raw.socket, 'data');
    })(),
    2000,
    'CONNACK',
  );
  assert.deepEqual(Buffer.concat(raw.received).subarray(0, 4), CONNACK_OK);
  return raw;
}

function findSymbol(obj: object, description: string): symbol | undefined {
  return Object.getOwnPropertySymbols(obj).find((s) => s.description === description);
}

// ── tests ──────────────────────────────────────────────────────────────────────────────────────────────────────

test('port 0 is read back, TCP_NODELAY is on for broker sockets, and a QoS 1 round trip works', async (t) => {
  const defer = cleanup(t);
  const { b } = await loggedBroker(defer);
  assert.ok(b.port > 0);
  assert.equal(b.url, `mqtt://127.0.0.1:${b.port}`);

  const brokerSockets: net.Socket[] = [];
  b.aedes.on('client', (c) => brokerSockets.push(c.conn as net.Socket));
  const sub = await connect(defer, b, 'agent-one');
  const pub = await connect(defer, b, 'client-one');
  assert.equal(b.clientCount(), 2);

  // The broker side of each connection is the real net.Socket, created with noDelay (Node keeps the flag in an
  // internal symbol; this is the only way to read it back without a getsockopt).
  assert.equal(brokerSockets.length, 2);
  for (const s of brokerSockets) {
    assert.ok(s instanceof net.Socket);
    const sym = findSymbol(s, 'kSetNoDelay');
    assert.ok(sym, 'Node exposes kSetNoDelay on sockets');
    assert.equal((s as unknown as Record<symbol, unknown>)[sym], true);
  }

  const topic = topics.agentRequest('agent-one', 'client-one');
  const granted = await sub.subscribeAsync(topics.agentRequestsFor('agent-one'), { qos: 1 });
  assert.equal(granted[0]?.qos, 1);
  const got = nextMessage(sub);
  const t0 = process.hrtime.bigint();
  await pub.publishAsync(topic, Buffer.from([1, 2, 3]), { qos: 1 });
  const m = await got;
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  assert.equal(m.topic, topic);
  assert.equal(m.qos, 1);
  assert.deepEqual([...m.payload], [1, 2, 3]);
  assert.ok(ms < 500, `round trip took ${ms} ms`);
});

test('a PUBLISH declaring ~256 MB (or more than maxPacketBytes, or a 5-byte length) is dropped at its header', async (t) => {
  const defer = cleanup(t);
  const { b, logs } = await loggedBroker(defer, { maxPacketBytes: 64 * 1024 });

  // 1. Remaining Length 268,435,455 (the 4-byte maximum) after a valid CONNECT.
  const huge = await rawConnected(defer, b, 'raw-huge');
  const sentAt = Date.now();
  huge.socket.write(Buffer.from([0x30, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x03, 0x61, 0x2f, 0x62]));
  const closedAt = await withTimeout(huge.closed, 1000, 'huge PUBLISH close');
  assert.ok(closedAt - sentAt < 1000);
  const rejection = logs.find((l) => l.msg === 'connection dropped by framing guard' && l.reason === 'packet-too-large');
  assert.ok(rejection, 'guard logged the rejection');
  assert.equal(rejection.declaredBytes, 1 + 4 + 268_435_455);
  assert.equal(rejection.clientId, 'raw-huge');
  assert.equal(rejection.level, 40); // warn

  // 2. Just over the configured cap, with the body actually sent: nothing is delivered, the socket closes.
  const watcher = await connect(defer, b, 'watcher');
  await watcher.subscribeAsync('big/+', { qos: 0 });
  const over = await rawConnected(defer, b, 'raw-over');
  const topic = str('big/one');
  const bodyLen = 64 * 1024; // + 1 type byte + 3 length bytes > 64 KiB
  const header = Buffer.from([0x30, (bodyLen & 0x7f) | 0x80, ((bodyLen >> 7) & 0x7f) | 0x80, bodyLen >> 14]);
  over.socket.write(Buffer.concat([header, topic, Buffer.alloc(bodyLen - topic.length)]));
  await withTimeout(over.closed, 1000, 'over-cap close');
  assert.deepEqual(await messagesDuring(watcher, 100), []);

  // A packet exactly at the cap still passes.
  const atCap = await rawConnected(defer, b, 'raw-at-cap');
  const okLen = 64 * 1024 - 4;
  const okHeader = Buffer.from([0x30, (okLen & 0x7f) | 0x80, ((okLen >> 7) & 0x7f) | 0x80, okLen >> 14]);
  const got = nextMessage(watcher);
  atCap.socket.write(Buffer.concat([okHeader, topic, Buffer.alloc(okLen - topic.length, 7)]));
  const m = await got;
  assert.equal(m.topic, 'big/one');
  assert.equal(m.payload.length, okLen - topic.length);

  // 3. A Remaining Length with a fifth continuation byte.
  const bad = await rawConnected(defer, b, 'raw-varint');
  bad.socket.write(Buffer.from([0x30, 0xff, 0xff, 0xff, 0xff, 0x01]));
  await withTimeout(bad.closed, 1000, 'bad varint close');
  assert.ok(logs.some((l) => l.reason === 'bad-remaining-length'));

  await assertServing(defer, b, 'after-huge');
});

test('garbage bytes and an HTTP request are closed without a reply; the broker keeps serving', async (t) => {
  const defer = cleanup(t);
  const { b, logs } = await loggedBroker(defer);

  const http = await rawSocket(defer, b);
  http.socket.write('GET / HTTP/1.1\r\nHost: localhost\r\n\r\n');
  await withTimeout(http.closed, 1000, 'HTTP close');
  assert.equal(Buffer.concat(http.received).length, 0, 'no CONNACK or anything else leaked');
  // Dropped by the framing guard on its first byte, not left to the MQTT parser.
  assert.ok(logs.some((l) => l.reason === 'not-mqtt' && l.firstByte === 'G'.charCodeAt(0)));

  const garbage = await rawSocket(defer, b);
  garbage.socket.write(Buffer.from([0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02]));
  await withTimeout(garbage.closed, 1000, 'garbage close');
  assert.equal(Buffer.concat(garbage.received).length, 0);

  // A well-framed CONNECT with a bad protocol name is aedes' parser's job: closed, no CONNACK 0.
  const badName = await rawSocket(defer, b);
  const body = Buffer.concat([str('MQXX'), Buffer.from([4, 0x02, 0, 60]), str('bad-name')]);
  badName.socket.write(Buffer.concat([Buffer.from([0x10, body.length]), body]));
  await withTimeout(badName.closed, 1000, 'bad protocol name close');
  assert.notDeepEqual(Buffer.concat(badName.received).subarray(0, 4), CONNACK_OK);

  assert.equal(b.clientCount(), 0);
  await assertServing(defer, b, 'after-garbage');
});

test('QoS 2 publishes are refused (publisher disconnected, nothing delivered) while QoS 1 works', async (t) => {
  const defer = cleanup(t);
  const { b, logs } = await loggedBroker(defer);
  const sub = await connect(defer, b, 'agent-one');
  await sub.subscribeAsync(topics.agentRequestsFor('agent-one'), { qos: 1 });

  const bad = await connect(defer, b, 'client-bad');
  const topic2 = topics.agentRequest('agent-one', 'client-bad');
  const closed = waitClose(bad);
  bad.publish(topic2, 'qos2', { qos: 2 });
  await closed;
  assert.deepEqual(await messagesDuring(sub, 100), []);
  const line = logs.find((l) => l.msg === 'publish refused' && l.reason === 'qos2');
  assert.ok(line);
  assert.equal(line.clientId, 'client-bad');
  assert.equal(line.topic, topic2);
  assert.equal(line.level, 40);

  const good = await connect(defer, b, 'client-good');
  const got = nextMessage(sub);
  await good.publishAsync(topics.agentRequest('agent-one', 'client-good'), 'qos1', { qos: 1 });
  assert.equal((await got).payload.toString(), 'qos1');
});

test("retain is kept only on the publisher's own status topic", async (t) => {
  const defer = cleanup(t);
  const { b, logs } = await loggedBroker(defer);

  // agent-one tries to squat agent-two's status: refused and disconnected.
  const squatter = await connect(defer, b, 'agent-one');
  const closed = waitClose(squatter);
  squatter.publish(topics.agentStatus('agent-two'), 'fake-online', { qos: 1, retain: true });
  await closed;
  assert.ok(logs.some((l) => l.reason === 'retain-not-own-status' && l.clientId === 'agent-one'));

  // Retain on its own but non-status topic (load) is refused too.
  const loader = await connect(defer, b, 'agent-three');
  const loaderClosed = waitClose(loader);
  loader.publish(topics.agentLoad('agent-three'), 'load', { qos: 0, retain: true });
  await loaderClosed;

  // agent-two's own status is retained.
  const owner = await connect(defer, b, 'agent-two');
  await owner.publishAsync(topics.agentStatus('agent-two'), 'online', { qos: 1, retain: true });

  const router = await connect(defer, b, 'router-one');
  const seen = messagesDuring(router, 300);
  const granted = await router.subscribeAsync([topics.allAgentStatus(), topics.allAgentLoad()], { qos: 1 });
  assert.deepEqual(
    granted.map((g) => g.qos),
    [1, 1],
  );
  const messages = await seen;
  assert.deepEqual(messages, [{ topic: topics.agentStatus('agent-two'), retain: true, payload: 'online' }]);
});

test('subscriptions to #, +/#, +/+/#, $SYS/# and over-cap filters get 128; QoS 2 is downgraded to 1', async (t) => {
  const defer = cleanup(t);
  const { b, logs } = await loggedBroker(defer);
  const c = await connect(defer, b, 'router-one');
  const deep = Array.from({ length: 9 }, (_, i) => `l${i}`).join('/');
  const long = `long/${'x'.repeat(300)}`;
  const byTopic = await grantedQoS(c, {
    '#': { qos: 0 },
    '+/#': { qos: 1 },
    '+/+/#': { qos: 1 },
    '$SYS/#': { qos: 0 },
    '$SYS/+/heartbeat': { qos: 0 },
    [deep]: { qos: 0 },
    [long]: { qos: 0 },
    [topics.allAgentStatus()]: { qos: 2 },
    'mesh/v1/agent/#': { qos: 1 },
  });
  assert.deepEqual(byTopic, {
    '#': 128,
    '+/#': 128,
    '+/+/#': 128,
    '$SYS/#': 128,
    '$SYS/+/heartbeat': 128,
    [deep]: 128,
    [long]: 128,
    [topics.allAgentStatus()]: 1,
    'mesh/v1/agent/#': 1,
  });
  assert.ok(
    logs.some((l) => l.msg === 'subscribe refused' && l.topic === '#' && l.reason === 'wildcard-all' && l.clientId === 'router-one'),
  );
  assert.ok(logs.some((l) => l.topic === deep && l.reason === 'too-many-levels'));
  assert.ok(c.connected, 'a refused subscription does not cost the connection');

  // The downgraded subscription delivers at QoS 1.
  const agent = await connect(defer, b, 'agent-one');
  const got = nextMessage(c);
  await agent.publishAsync(topics.agentStatus('agent-one'), 'up', { qos: 1, retain: true });
  assert.equal((await got).qos, 1);
});

test('topics deeper than maxTopicLevels or longer than maxTopicBytes (or with NUL, or $SYS) are not delivered', async (t) => {
  const defer = cleanup(t);
  const { b, logs } = await loggedBroker(defer);
  const sub = await connect(defer, b, 'watcher');
  await sub.subscribeAsync('deep/#', { qos: 0 });

  const cases: [string, string][] = [
    [`deep/${Array.from({ length: 8 }, (_, i) => `l${i}`).join('/')}`, 'too-many-levels'], // 9 levels
    [`deep/${'x'.repeat(252)}`, 'topic-too-long'], // 257 bytes
    [`deep/${'é'.repeat(126)}`, 'topic-too-long'], // 131 chars but 257 UTF-8 bytes
    ['deep/a\u0000b', 'nul-in-topic'],
    ['$SYS/fake/heartbeat', 'reserved-topic'],
  ];
  for (const [i, [topic, reason]] of cases.entries()) {
    const pub = await connect(defer, b, `pub-${i}`);
    const closed = waitClose(pub);
    pub.publish(topic, 'x', { qos: 0 });
    await closed;
    assert.ok(
      logs.some((l) => l.msg === 'publish refused' && l.reason === reason && l.clientId === `pub-${i}`),
      reason,
    );
  }
  assert.deepEqual(await messagesDuring(sub, 100), []);

  // At the caps exactly: 8 levels and 256 bytes are delivered.
  const ok = await connect(defer, b, 'pub-ok');
  const eight = `deep/${Array.from({ length: 7 }, (_, i) => `l${i}`).join('/')}`;
  const max = `deep/${'y'.repeat(251)}`;
  assert.equal(Buffer.byteLength(max), 256);
  const got = messagesDuring(sub, 200);
  await ok.publishAsync(eight, 'a', { qos: 1 });
  await ok.publishAsync(max, 'b', { qos: 1 });
  assert.deepEqual(
    (await got).map((m) => m.topic),
    [eight, max],
  );
});

test('a socket that connects and sends nothing is closed after connectTimeoutMs', async (t) => {
  const defer = cleanup(t);
  const { b } = await loggedBroker(defer, { connectTimeoutMs: 300 });
  const raw = await rawSocket(defer, b);
  const openedAt = Date.now();
  const closedAt = await withTimeout(raw.closed, 2000, 'connect timeout');
  const elapsed = closedAt - openedAt;
  assert.ok(elapsed >= 250, `closed too early (${elapsed} ms)`);
  assert.ok(elapsed < 1500, `closed too late (${elapsed} ms)`);

  // A half-sent CONNECT (slowloris) is closed by the same deadline.
  const slow = await rawSocket(defer, b);
  slow.socket.write(connectPacket({ clientId: 'slow-one', keepalive: 60 }).subarray(0, 5));
  const slowOpened = Date.now();
  const slowClosed = await withTimeout(slow.closed, 2000, 'slowloris timeout');
  assert.ok(slowClosed - slowOpened < 1500);
  assert.equal(Buffer.concat(slow.received).length, 0);
});

test("a will aimed at another client's status topic is refused; one on its own status is published", async (t) => {
  const defer = cleanup(t);
  const { b, logs } = await loggedBroker(defer);

  await assert.rejects(
    mqtt.connectAsync(b.url, {
      protocolVersion: 4,
      clientId: 'agent-one',
      reconnectPeriod: 0,
      connectTimeout: 2000,
      will: { topic: topics.agentStatus('agent-two'), payload: Buffer.from('offline'), qos: 1, retain: true },
    }),
    (err: Error & { code?: number }) => err.code === 5, // CONNACK 5: not authorized
  );
  const line = logs.find((l) => l.msg === 'connect refused');
  assert.ok(line);
  assert.equal(line.reason, 'will-not-own-status');
  assert.equal(line.clientId, 'agent-one');
  assert.equal(line.topic, topics.agentStatus('agent-two'));
  assert.equal(b.clientCount(), 0);

  // A QoS 2 will is refused as well.
  await assert.rejects(
    mqtt.connectAsync(b.url, {
      protocolVersion: 4,
      clientId: 'agent-one',
      reconnectPeriod: 0,
      will: { topic: topics.agentStatus('agent-one'), payload: Buffer.from('offline'), qos: 2, retain: true },
    }),
    (err: Error & { code?: number }) => err.code === 5,
  );

  // The proper LWT: own status, retained; delivered when the agent vanishes without DISCONNECT.
  const router = await connect(defer, b, 'router-one');
  await router.subscribeAsync(topics.allAgentStatus(), { qos: 1 });
  const agent = await connect(defer, b, 'agent-one', {
    will: { topic: topics.agentStatus('agent-one'), payload: Buffer.from('offline'), qos: 1, retain: true },
  });
  const got = nextMessage(router);
  agent.stream.destroy();
  const m = await got;
  assert.equal(m.topic, topics.agentStatus('agent-one'));
  assert.equal(m.payload.toString(), 'offline');
});

test('close() disconnects clients, resolves, is idempotent, and stops listening', async (t) => {
  const defer = cleanup(t);
  const { b } = await loggedBroker(defer);
  const c = await connect(defer, b, 'agent-one');
  const raw = await rawSocket(defer, b); // connected but no CONNECT: aedes does not know it
  assert.equal(b.clientCount(), 1);

  const closed = waitClose(c);
  const first = b.close();
  const second = b.close();
  assert.equal(first, second);
  await withTimeout(first, 3000, 'close()');
  await closed;
  await withTimeout(raw.closed, 1000, 'raw socket closed');
  assert.equal(b.clientCount(), 0);
  await b.close(); // still fine afterwards

  const refused = net.connect(b.port, '127.0.0.1');
  const [err] = (await once(refused, 'error')) as [NodeJS.ErrnoException];
  assert.equal(err.code, 'ECONNREFUSED');
});

test('options are validated, naming every bad field', async () => {
  await assert.rejects(
    startBroker({ port: -1, maxPacketBytes: 1.5, host: '', maxTopicLevels: 101, bogus: true } as BrokerOptions),
    (err: unknown) => {
      assert.ok(err instanceof MeshError);
      assert.equal(err.code, 'MESH_CONFIG');
      assert.deepEqual(err.details?.fields, ['bogus', 'port', 'host', 'maxPacketBytes', 'maxTopicLevels']);
      assert.match(err.message, /port/);
      return true;
    },
  );
  await assert.rejects(
    startBroker({ hooks: { authorizePublish: 'yes' } } as unknown as BrokerOptions),
    (err: unknown) => err instanceof MeshError && /hooks\.authorizePublish/.test(err.message),
  );
});

test('a second broker on a taken port fails with MESH_CONFIG', async (t) => {
  const defer = cleanup(t);
  const { b } = await loggedBroker(defer);
  await assert.rejects(startBroker({ port: b.port }), (err: unknown) => err instanceof MeshError && err.code === 'MESH_CONFIG');
});

test('hooks run after the built-in checks and can refuse', async (t) => {
  const defer = cleanup(t);
  const seen: string[] = [];
  const { b, logs } = await loggedBroker(defer, {
    metricsPort: 0,
    hooks: {
      authenticate: (c) => c.id !== 'agent-banned',
      authorizePublish: async (_c, packet) => {
        seen.push(packet.topic);
        return !packet.topic.endsWith('/forbidden');
      },
      authorizeSubscribe: (_c, sub) => (sub.topic === 'nope/+' ? null : sub),
    },
  });
  await assert.rejects(
    mqtt.connectAsync(b.url, { protocolVersion: 4, clientId: 'agent-banned', reconnectPeriod: 0 }),
    (err: Error & { code?: number }) => err.code === 5,
  );
  const c = await connect(defer, b, 'agent-one');
  assert.deepEqual(await grantedQoS(c, { 'nope/+': { qos: 1 }, 'yes/+': { qos: 1 } }), { 'nope/+': 128, 'yes/+': 1 });
  // A client asking again and again for what a hook refuses is counted each time and logged once a second at most.
  for (let i = 0; i < 30; i++) assert.deepEqual(await grantedQoS(c, { 'nope/+': { qos: 1 } }), { 'nope/+': 128 });
  const refusedWarnings = logs.filter((l) => l.msg === 'subscribe refused' && l.level === 40).length;
  assert.ok(refusedWarnings >= 1 && refusedWarnings <= 3, `${refusedWarnings} warnings for 31 refused subscriptions`);
  const metrics = await (await fetch(b.metricsUrl!)).text();
  assert.match(metrics, /edge_mesh_broker_subscribe_refusals_total\{code="MESH_FORBIDDEN"\} 31\n/);
  const got = nextMessage(c);
  await c.publishAsync('yes/ok', 'fine', { qos: 1 });
  assert.equal((await got).topic, 'yes/ok');
  const closed = waitClose(c);
  c.publish('yes/forbidden', 'no', { qos: 1 });
  await closed;
  // QoS 2 is refused before the hook is consulted.
  const d = await connect(defer, b, 'agent-two');
  const dClosed = waitClose(d);
  d.publish('yes/qos2', 'no', { qos: 2 });
  await dClosed;
  assert.deepEqual(seen, ['yes/ok', 'yes/forbidden']);
});

test('a preConnect hook refusal closes without a CONNACK; maxConnections caps sockets', async (t) => {
  const defer = cleanup(t);
  const { b, logs } = await loggedBroker(defer, {
    maxConnections: 2,
    hooks: { preConnect: (_c, packet) => packet.clientId !== 'agent-blocked' },
  });
  const blocked = await rawSocket(defer, b);
  blocked.socket.write(connectPacket({ clientId: 'agent-blocked', keepalive: 60 }));
  await withTimeout(blocked.closed, 1000, 'preConnect refusal');
  assert.equal(Buffer.concat(blocked.received).length, 0);
  // Refused again and again from one address: logged once a second at most.
  for (let i = 0; i < 20; i++) {
    const again = await rawSocket(defer, b);
    again.socket.write(connectPacket({ clientId: 'agent-blocked', keepalive: 60 }));
    await withTimeout(again.closed, 1000, 'preConnect refusal');
  }
  const hookWarnings = logs.filter((l) => l.msg === 'connect refused' && l.reason === 'hook' && l.level === 40).length;
  assert.ok(hookWarnings >= 1 && hookWarnings <= 3, `${hookWarnings} warnings for 21 refused connects`);

  const first = await rawConnected(defer, b, 'raw-one');
  const second = await rawSocket(defer, b);
  const third = await rawSocket(defer, b); // over the cap: the server drops it at accept
  await withTimeout(third.closed, 1000, 'third connection dropped');
  assert.ok(!first.socket.destroyed && !second.socket.destroyed);
});

test('PacketSizeGuard follows packet boundaries across arbitrary chunking', () => {
  const packets = [
    Buffer.from([0x10, 0x03, 1, 2, 3]), // CONNECT first
    Buffer.from([0xc0, 0x00]), // PINGREQ, empty body
    Buffer.concat([Buffer.from([0x30, 0x80, 0x01]), Buffer.alloc(128, 9)]), // 2-byte length, 131 bytes total
    Buffer.concat([Buffer.from([0x32, 0x7f]), Buffer.alloc(127, 1)]), // 129 bytes total
  ];
  const stream = Buffer.concat(packets);
  for (const size of [1, 2, 3, 7, 64, stream.length]) {
    const guard = new PacketSizeGuard(131);
    for (let i = 0; i < stream.length; i += size) {
      assert.equal(guard.accept(stream.subarray(i, i + size)), undefined, `chunk size ${size} at ${i}`);
    }
    // The next header declares 132 bytes: rejected even when only its length bytes have arrived, one at a time.
    assert.equal(guard.accept(Buffer.from([0x30])), undefined);
    assert.equal(guard.accept(Buffer.from([0x81])), undefined);
    assert.deepEqual(guard.accept(Buffer.from([0x01])), { reason: 'packet-too-large', declaredBytes: 132, maxPacketBytes: 131 });
    assert.ok(guard.accept(Buffer.from([0x00])), 'stays rejected');
  }
  assert.equal(new PacketSizeGuard(100).accept(Buffer.from('GET / HTTP/1.1'))?.reason, 'not-mqtt');
  const g = new PacketSizeGuard(100);
  assert.equal(g.accept(Buffer.from([0x10, 0x00])), undefined);
  assert.equal(g.accept(Buffer.from([0x00, 0x00]))?.reason, 'bad-packet-type');
});
