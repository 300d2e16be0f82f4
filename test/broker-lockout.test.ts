/**
 * One bad client must not lock out a site (issue 13, docs/security.md "Connecting"). Every case runs against the
 * real broker with its default limits, with real mqtt.js clients and raw sockets from 127.0.0.1, the address the
 * well-behaved clients use too: as if all of them sat behind one NAT.
 *
 * Before these limits, 20 bad tokens in 10 s, or 1,000 half-open sockets, from one address blocked every new
 * connection from it for a minute, admitted agents included.
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { openMeshConnection } from '@edge-mesh/client';
import { generateIdentity, type Identity, MeshError, makeConnectToken, topics } from '@edge-mesh/protocol';
import { resolveBrokerOptions } from '../broker/src/options.ts';
import {
  admitted,
  assertServing,
  authBrokerFor,
  cleanup,
  connect,
  connectPacket,
  nextMessage,
  type Raw,
  rawSocket,
  withTimeout,
} from './broker-fixtures.ts';

const authBroker = authBrokerFor('lockout-');

function authConnect(who: Identity, signer: Identity = who): Buffer {
  return connectPacket({ clientId: who.id, username: who.id, password: makeConnectToken({ ...who, privateKey: signer.privateKey }) });
}

/** The CONNACK return code, or undefined when the socket closed without one. */
async function connackCode(raw: Raw, timeoutMs = 3000): Promise<number | undefined> {
  const deadline = Date.now() + timeoutMs;
  while (raw.bytes().length < 4 && !raw.isClosed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  const b = raw.bytes();
  if (b.length < 4) return undefined;
  assert.equal(b[0], 0x20);
  return b[3];
}

async function connackFor(
  defer: Parameters<typeof rawSocket>[0],
  ab: Awaited<ReturnType<typeof authBroker>>,
  packet: Buffer,
  from?: string,
) {
  const raw = await rawSocket(defer, ab.b, from);
  raw.socket.write(packet);
  return connackCode(raw);
}

test('a bad-token storm naming one id bans that id from that address only: another agent there is served', {
  timeout: 30_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const victim = await admitted(ab, 'agent');
  const forger = generateIdentity('agent');
  // 25 forged tokens for the victim's id from 127.0.0.1, well within 10 s: the first 20 reach the signature check.
  const codes: (number | undefined)[] = [];
  for (let i = 0; i < 25; i++) codes.push(await connackFor(defer, ab, authConnect(victim, forger)));
  assert.deepEqual(codes.slice(0, 20), Array(20).fill(5), 'refused as not authorized until the ban');
  assert.deepEqual(codes.slice(20), Array(5).fill(3), 'then CONNACK 3 (server unavailable), before any signature check');
  assert.ok(ab.logs.some((l) => l.msg === 'client limited' && l.clientId === victim.id && l.remoteAddress === '127.0.0.1'));
  assert.ok(!ab.logs.some((l) => l.msg === 'address limited'), 'the address itself is not limited');
  assert.equal(ab.logs.filter((l) => l.reason === 'bad-signature').length, 20, 'no signature checked after the ban');

  // Another admitted agent and app from the same address connect and exchange a request and a reply.
  await assertServing(defer, ab, 5000);
  // The victim's own key from another address is not affected: a stranger cannot lock an id out from elsewhere.
  assert.equal(await connackFor(defer, ab, authConnect(victim), '127.0.0.5'), 0);

  // From the banned address even the right key is refused, with a code the client surfaces once, not per retry.
  const refusals: MeshError[] = [];
  let attempts = 0;
  const conn = openMeshConnection(ab.b.url, {
    identity: victim,
    backoff: { baseMs: 20, maxMs: 40 },
    onRefused: (err) => refusals.push(err),
  });
  defer(() => conn.close());
  conn.client.on('error', () => attempts++);
  const deadline = Date.now() + 10_000;
  while (attempts < 4 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  assert.ok(attempts >= 4, `${attempts} refused attempts`);
  assert.equal(refusals.length, 1, 'reported once for the whole run of refusals');
  assert.ok(refusals[0] instanceof MeshError);
  assert.equal(refusals[0].code, 'MESH_RATE_LIMITED');
  assert.equal(refusals[0].details?.returnCode, 3);
  assert.equal(conn.refusal?.code, 'MESH_RATE_LIMITED');
  assert.equal(conn.client.connected, false);
});

test('1,000 half-open sockets from one address do not keep an authenticated client from it out', { timeout: 60_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const flood: Raw[] = [];
  for (let i = 0; i < 1000; i++) flood.push(await rawSocket(defer, ab.b));
  // The flood holds the default per-address cap of sockets without CONNECT; a new client still gets in and is served
  // (each of its sockets evicts the oldest idle one).
  await assertServing(defer, ab, 10_000);
  const stillOpen = flood.filter((r) => !r.isClosed()).length;
  assert.ok(stillOpen < 1000, `${stillOpen} flood sockets still open: the oldest was evicted`);
  assert.ok(ab.logs.some((l) => l.reason === 'too-many-connections' && l.remoteAddress === '127.0.0.1'));
  // The clients that finished CONNECT are not evicted by more flooding.
  const agentId = await admitted(ab, 'agent');
  const agent = await connect(defer, ab.b, agentId);
  for (let i = 0; i < 50; i++) flood.push(await rawSocket(defer, ab.b));
  await agent.subscribeAsync(topics.agentRequestsFor(agentId.id), { qos: 1 });
  const appId = await admitted(ab, 'app');
  const app = await connect(defer, ab.b, appId);
  const got = nextMessage(agent, 5000);
  await app.publishAsync(topics.agentRequest(agentId.id, appId.id), 'still here', { qos: 1 });
  assert.equal((await got).payload.toString(), 'still here');
  assert.ok(agent.connected);
});

test('an unauthenticated flood limits its address, yet admitted ids from it still get in', { timeout: 30_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer, { addressFailuresBeforeLimit: 30, banMs: 60_000 });
  // Strangers (well-formed ids nobody admitted) and garbage ids, from 127.0.0.1.
  const codes: (number | undefined)[] = [];
  for (let i = 0; i < 40; i++) {
    const stranger = generateIdentity('agent');
    const packet = i % 2 ? authConnect(stranger) : connectPacket({ clientId: `junk-${i}`, username: 'x', password: Buffer.from('y') });
    codes.push(await connackFor(defer, ab, packet));
  }
  assert.ok(
    codes.slice(0, 30).every((c) => c === 5 || c === 2),
    `refused as usual until the limit: ${codes.slice(0, 30)}`,
  );
  assert.deepEqual(codes.slice(30), Array(10).fill(3), 'then CONNACK 3 without further checks');
  assert.ok(ab.logs.some((l) => l.msg === 'address limited' && l.remoteAddress === '127.0.0.1'));
  // Valid credentials from the limited address are still admitted and served.
  await assertServing(defer, ab, 5000);
  // A forged token for an admitted id from the limited address is still refused, as not authorized.
  const agent = await admitted(ab, 'agent');
  assert.equal(await connackFor(defer, ab, authConnect(agent, generateIdentity('agent'))), 5);
  assert.equal(await connackFor(defer, ab, authConnect(agent)), 0);
});

test('beyond its CONNECT rate an address still admits valid credentials; strangers get CONNACK 3', { timeout: 30_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer, { connectBurstPerIp: 5, connectRatePerIp: 1 });
  const strangers: (number | undefined)[] = [];
  for (let i = 0; i < 10; i++) strangers.push(await connackFor(defer, ab, authConnect(generateIdentity('app')), '127.0.0.3'));
  assert.deepEqual(strangers.slice(0, 5), Array(5).fill(5), 'within the bucket: checked and refused as not admitted');
  assert.ok(
    strangers.slice(5).every((c) => c === 3),
    `over the rate: refused before any check (${strangers.slice(5)})`,
  );
  const app = await admitted(ab, 'app');
  for (let i = 0; i < 5; i++) assert.equal(await connackFor(defer, ab, authConnect(app), '127.0.0.3'), 0, `admitted CONNECT ${i}`);
  const warned = ab.logs.filter((l) => l.reason === 'connect-rate' && l.level === 40);
  assert.equal(warned.length, 1, 'the run over the rate is logged once at warn');
  await withTimeout(assertServing(defer, ab, 5000), 6000, 'serving');
});

test('a client blasting publishes is slowed to its byte rate while another client is served', { timeout: 30_000 }, async (t) => {
  const defer = cleanup(t);
  const rate = 256 * 1024;
  const ab = await authBroker(defer, {
    byteRatePerClient: rate,
    byteBurstPerClient: rate,
    publishRatePerClient: 1_000_000,
    publishBurstPerClient: 1_000_000,
  });
  const agentId = await admitted(ab, 'agent');
  const blasterId = await admitted(ab, 'app');
  const agent = await connect(defer, ab.b, agentId);
  const blaster = await connect(defer, ab.b, blasterId);
  await agent.subscribeAsync(topics.agentRequestsFor(agentId.id), { qos: 1 });
  let received = 0;
  agent.on('message', (topic, payload) => {
    if (topic === topics.agentRequest(agentId.id, blasterId.id)) received += payload.length;
  });
  // 16 MiB of garbage at QoS 0, as fast as the socket takes it: 64 times the bucket.
  const chunk = Buffer.alloc(64 * 1024, 0xab);
  const t0 = Date.now();
  for (let i = 0; i < 256; i++) blaster.publish(topics.agentRequest(agentId.id, blasterId.id), chunk, { qos: 0 });
  // Meanwhile another app's requests keep being answered.
  await assertServing(defer, ab, 10_000);
  await new Promise((r) => setTimeout(r, 1500));
  const elapsedS = (Date.now() - t0) / 1000;
  // The broker forwarded at most the burst plus the rate over the elapsed time (plus one chunk read past the bucket).
  const ceiling = rate + rate * elapsedS + 2 * chunk.length;
  assert.ok(received <= ceiling, `forwarded ${received} bytes in ${elapsedS.toFixed(1)} s, ceiling ${Math.round(ceiling)}`);
  assert.ok(received >= rate / 2, `slowed, not cut off: ${received} bytes forwarded`);
  assert.ok(blaster.connected, 'the blaster is throttled, not disconnected');
  assert.ok(ab.logs.some((l) => l.reason === 'byte-rate' && l.clientId === blasterId.id));
  assert.equal(resolveBrokerOptions({}).byteRatePerClient, 64 * 1024 * 1024, 'a byte rate applies by default');
});
