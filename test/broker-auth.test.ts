/**
 * The broker in authenticated mode: CONNECT tokens, admissions and revocations (API and over MQTT), the durable
 * admission store, and the per-role topic ACLs. Real broker on port 0, real mqtt.js clients and raw TCP sockets.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import net from 'node:net';
import test from 'node:test';
import { type BrokerHandle, decodeAdminAck, encodeAdminRecord, startBroker } from '@edge-mesh/broker';
import { admit, generateIdentity, type Identity, MeshError, makeConnectToken, revoke, topics } from '@edge-mesh/protocol';
import mqtt, { type IClientOptions } from 'mqtt';
import { IpGuard, NonceCache } from '../broker/src/limits.ts';
import {
  type AuthBroker,
  admitted,
  assertServing,
  authBrokerFor,
  CLIENT_DEFAULTS,
  cleanup,
  connect,
  type Defer,
  grantedQoS,
  type LogLine,
  loggedBroker,
  messagesDuring,
  nextMessage,
  options,
  str,
  tempDir,
  waitClose,
} from './broker-fixtures.ts';

// ── helpers ────────────────────────────────────────────────────────────────────────────────────────────────────

const TMP_PREFIX = 'broker-auth-';

/** An authenticated broker with one trusted operator; generous per-IP limits so tests are not rate limited. */
const authBroker = authBrokerFor(TMP_PREFIX, {
  connectBurstPerIp: 10_000,
  connectRatePerIp: 10_000,
  authFailuresBeforeBan: 10_000,
  addressFailuresBeforeLimit: 10_000,
});

/** Resolves with the CONNACK return code of a refused connect (fails if the connect succeeds). */
async function refusedCode(b: BrokerHandle, opts: IClientOptions): Promise<number> {
  const c = mqtt.connect(b.url, { ...CLIENT_DEFAULTS, ...opts });
  try {
    return await new Promise<number>((resolve, reject) => {
      c.once('connect', () => reject(new Error(`connect of ${String(opts.clientId)} was accepted`)));
      c.once('error', (err: Error & { code?: number }) => (typeof err.code === 'number' ? resolve(err.code) : reject(err)));
      c.once('close', () => setTimeout(() => reject(new Error('closed without a CONNACK')), 50));
    });
  } finally {
    c.end(true);
  }
}

function refusal(logs: LogLine[], clientId: string): string | undefined {
  return logs.filter((l) => l.msg === 'connect refused' && l.clientId === clientId).at(-1)?.reason;
}

// ── authentication ─────────────────────────────────────────────────────────────────────────────────────────────

test('an admitted agent and app connect and exchange a request and a reply', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  assert.equal(ab.b.mode, 'auth');
  assert.ok(!ab.logs.some((l) => /open mode/.test(l.msg)), 'no open-mode warning in auth mode');
  await assertServing(defer, ab);
  assert.equal(ab.b.clientCount(), 2);
  // An empty username is accepted too (the id is the client id).
  const agent = await admitted(ab, 'agent');
  const c = await connect(defer, ab.b, agent, { username: '' });
  assert.ok(c.connected);
});

test('open mode logs one warning that anonymous clients are accepted', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const { b, logs } = await loggedBroker(defer);
  assert.equal(b.mode, 'open');
  const warns = logs.filter((l) => l.level === 40);
  assert.equal(warns.length, 1);
  assert.match(warns[0]!.msg, /anonymous clients are accepted/);
  const c = await mqtt.connectAsync(b.url, { protocolVersion: 4, clientId: 'anything-goes', reconnectPeriod: 0 });
  defer(() => c.endAsync(true));
  assert.ok(c.connected);
  await assert.rejects(
    b.admit(admit(generateIdentity('operator'), generateIdentity('agent'))),
    (err: unknown) => err instanceof MeshError && err.code === 'MESH_CONFIG',
  );
  assert.deepEqual(b.admissions(), []);
});

test('unknown ids, anonymous clients and clients without a token are refused', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const stranger = generateIdentity('agent');
  assert.equal(await refusedCode(ab.b, options(stranger)), 5);
  assert.equal(refusal(ab.logs, stranger.id), 'not-admitted');

  // Anonymous: an id that is not key-derived is rejected as an identifier, with or without a password.
  assert.equal(await refusedCode(ab.b, { clientId: 'some-device' }), 2);
  assert.equal(refusal(ab.logs, 'some-device'), 'id-not-key-derived');
  assert.equal(await refusedCode(ab.b, { clientId: '' }), 2);
  // A key-derived, admitted id with no password, a short password, or a username that is another id.
  const agent = await admitted(ab, 'agent');
  assert.equal(await refusedCode(ab.b, { clientId: agent.id }), 5);
  assert.equal(refusal(ab.logs, agent.id), 'no-token');
  assert.equal(await refusedCode(ab.b, { clientId: agent.id, username: agent.id, password: Buffer.from('hunter2') }), 5);
  assert.equal(refusal(ab.logs, agent.id), 'bad-token');
  assert.equal(await refusedCode(ab.b, { ...options(agent), username: generateIdentity('agent').id }), 5);
  assert.equal(refusal(ab.logs, agent.id), 'username-not-client-id');
  // A role prefix that does not match the admitted role: the id derives from the key *and* the role.
  const asApp = { ...agent, role: 'app' as const, id: agent.id.replace(/^agent-/, 'app-') };
  assert.equal(await refusedCode(ab.b, options(asApp)), 5);
  assert.equal(refusal(ab.logs, asApp.id), 'not-admitted');

  // Passwords never reach the log.
  const text = JSON.stringify(ab.logs);
  assert.ok(!/password/i.test(text));
  assert.ok(!text.includes('hunter2'));
  assert.equal(ab.b.clientCount(), 0);
  await assertServing(defer, ab);
});

test('a token signed by the wrong key, a stale or future timestamp, and a replayed token are refused', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const other = generateIdentity('agent');

  const forged = makeConnectToken({ ...agent, privateKey: other.privateKey });
  assert.equal(await refusedCode(ab.b, { ...options(agent), password: forged }), 5);
  assert.equal(refusal(ab.logs, agent.id), 'bad-signature');

  assert.equal(await refusedCode(ab.b, { ...options(agent), password: makeConnectToken(agent, Date.now() - 61_000) }), 5);
  assert.equal(refusal(ab.logs, agent.id), 'stale-token');
  assert.equal(await refusedCode(ab.b, { ...options(agent), password: makeConnectToken(agent, Date.now() + 61_000) }), 5);
  assert.equal(refusal(ab.logs, agent.id), 'stale-token');
  // Within the skew window both ways is fine.
  const early = await connect(defer, ab.b, agent, { password: makeConnectToken(agent, Date.now() - 50_000) });
  await early.endAsync();

  const token = makeConnectToken(agent);
  const first = await connect(defer, ab.b, agent, { password: token });
  await first.endAsync();
  assert.equal(await refusedCode(ab.b, { ...options(agent), password: token }), 5);
  assert.equal(refusal(ab.logs, agent.id), 'replayed-token');
  // A nonce is remembered only after its signature held: a forged token cannot burn a nonce in advance.
  const nonce = Buffer.alloc(16, 7);
  const now = Date.now();
  assert.equal(
    await refusedCode(ab.b, { ...options(agent), password: makeConnectToken({ ...agent, privateKey: other.privateKey }, now, nonce) }),
    5,
  );
  const c = await connect(defer, ab.b, agent, { password: makeConnectToken(agent, now, nonce) });
  assert.ok(c.connected);
});

test('a second CONNECT with a known id but the wrong key is refused and the first stays connected; the right key takes over', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const app = await admitted(ab, 'app');
  const first = await connect(defer, ab.b, agent);
  await first.subscribeAsync(topics.agentRequestsFor(agent.id), { qos: 1 });
  let firstClosed = false;
  first.on('close', () => (firstClosed = true));

  const impostor = generateIdentity('agent');
  assert.equal(
    await refusedCode(ab.b, { ...options(agent), password: makeConnectToken({ ...agent, privateKey: impostor.privateKey }) }),
    5,
  );
  await new Promise((r) => setTimeout(r, 100));
  assert.ok(!firstClosed && first.connected, 'the original connection survived the takeover attempt');
  const sender = await connect(defer, ab.b, app);
  const got = nextMessage(first);
  await sender.publishAsync(topics.agentRequest(agent.id, app.id), 'still-here', { qos: 1 });
  assert.equal((await got).payload.toString(), 'still-here');

  // The same key again (a restarted device): the new connection takes over, the old one is closed.
  const closed = waitClose(first);
  const second = await connect(defer, ab.b, agent);
  await closed;
  assert.ok(second.connected);
  assert.equal(ab.b.clientCount(), 2);
});

// ── admissions and revocations ─────────────────────────────────────────────────────────────────────────────────

test('a revoked client is cut off within a second and cannot reconnect; a newer admission re-enables it', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const router = await connect(defer, ab.b, await admitted(ab, 'router'));
  await router.subscribeAsync(topics.allAgentStatus(), { qos: 1 });
  const c = await connect(defer, ab.b, agent, {
    will: { topic: topics.agentStatus(agent.id), payload: Buffer.from('offline'), qos: 1, retain: true },
  });
  assert.ok(ab.b.admissions().some((a) => a.id === agent.id));

  const closed = waitClose(c);
  const will = nextMessage(router);
  const t0 = Date.now();
  const revocation = await ab.b.revoke(revoke(ab.op, agent.id));
  const closedAt = await closed;
  assert.ok(closedAt - t0 < 1000, `cut off after ${closedAt - t0} ms`);
  assert.equal(revocation.id, agent.id);
  assert.equal((await will).payload.toString(), 'offline', 'its will announced it offline');
  assert.ok(!ab.b.admissions().some((a) => a.id === agent.id));
  assert.deepEqual(
    ab.b.revocations().map((r) => r.id),
    [agent.id],
  );
  assert.equal(await refusedCode(ab.b, options(agent)), 5);
  assert.equal(refusal(ab.logs, agent.id), 'revoked');

  // Replaying the old admission does not undo the revocation; a newer one does.
  await assert.rejects(
    ab.b.admit(admit(ab.op, agent, { nowMs: revocation.revokedAt - 1 })),
    (err: unknown) => err instanceof MeshError && err.code === 'MESH_BAD_REQUEST',
  );
  assert.equal(await refusedCode(ab.b, options(agent)), 5);
  await ab.b.admit(admit(ab.op, agent, { nowMs: revocation.revokedAt + 1 }));
  const back = await connect(defer, ab.b, agent);
  assert.ok(back.connected);
});

test('records not signed by a trusted operator, expired or mismatched admissions are refused with MESH_UNAUTHORIZED', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const rogue = generateIdentity('operator');
  const agent = generateIdentity('agent');
  const unauthorized = (err: unknown) => err instanceof MeshError && err.code === 'MESH_UNAUTHORIZED';
  await assert.rejects(ab.b.admit(admit(rogue, agent)), unauthorized);
  await assert.rejects(ab.b.admit(admit(ab.op, agent, { ttlMs: -1 })), unauthorized);
  const signed = admit(ab.op, agent);
  await assert.rejects(ab.b.admit({ record: signed.record, sig: new Uint8Array(64) }), unauthorized);
  await assert.rejects(ab.b.revoke(revoke(rogue, agent.id)), unauthorized);
  await assert.rejects(ab.b.admit(revoke(ab.op, agent.id)), (err: unknown) => err instanceof MeshError && err.code === 'MESH_BAD_REQUEST');
  assert.deepEqual(ab.b.admissions(), []);
  assert.equal(await refusedCode(ab.b, options(agent)), 5);
  // The trusted operator itself is admitted implicitly and cannot be revoked by a record.
  const op = await connect(defer, ab.b, ab.op);
  assert.ok(op.connected);
  await assert.rejects(ab.b.revoke(revoke(ab.op, ab.op.id)), (err: unknown) => err instanceof MeshError && err.code === 'MESH_BAD_REQUEST');
});

test('an admission that expires while connected is cut off when it expires', { timeout: 10_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = generateIdentity('agent');
  const issued = Date.now();
  const expires = issued + 800;
  await ab.b.admit(admit(ab.op, agent, { nowMs: issued, ttlMs: 800 }));
  const c = await connect(defer, ab.b, agent);
  const closedAt = await waitClose(c, 4000);
  assert.ok(closedAt >= expires - 50, `cut off ${expires - closedAt} ms early`);
  assert.ok(ab.logs.some((l) => l.clientId === agent.id && l.reason === 'admission-expired'));
  assert.equal(await refusedCode(ab.b, options(agent)), 5);
  assert.equal(refusal(ab.logs, agent.id), 'admission-expired');
});

test("a re-admission moves a live client's cut-off: a shorter one cuts it off when it ends, a longer one keeps it on", {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  // Connected on a year's admission, then re-admitted for 500 ms: it once stayed connected past that.
  const agent = await admitted(ab, 'agent');
  const c = await connect(defer, ab.b, agent);
  const closed = waitClose(c, 3000);
  const issued = Date.now() + 1;
  await ab.b.admit(admit(ab.op, agent, { nowMs: issued, ttlMs: 500 }));
  const closedAt = await closed;
  assert.ok(closedAt >= issued + 500 - 50 && closedAt < issued + 1500, `cut off ${closedAt - issued} ms after the re-admission`);
  assert.ok(ab.logs.some((l) => l.clientId === agent.id && l.reason === 'admission-expired' && l.msg === 'client disconnected'));

  // Connected on an 800 ms admission, then re-admitted for a minute: it stays past the first one's end.
  const app = generateIdentity('app');
  await ab.b.admit(admit(ab.op, app, { ttlMs: 800 }));
  const a = await connect(defer, ab.b, app);
  await ab.b.admit(admit(ab.op, app, { nowMs: Date.now() + 1, ttlMs: 60_000 }));
  await new Promise((r) => setTimeout(r, 1200));
  assert.ok(a.connected, 'still connected after the first admission ended');
  await assertServing(defer, ab);
});

test('the admission store survives a broker restart on the same data folder', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const dataDir = await tempDir(defer, TMP_PREFIX);
  const op = generateIdentity('operator');
  const agent = generateIdentity('agent');
  const gone = generateIdentity('app');
  {
    const ab = await authBroker(() => {}, { op, dataDir });
    await ab.b.admit(admit(op, agent));
    await ab.b.admit(admit(op, gone));
    await ab.b.revoke(revoke(op, gone.id));
    await ab.b.close();
  }
  const ab = await authBroker(defer, { op, dataDir });
  assert.deepEqual(
    ab.b.admissions().map((a) => a.id),
    [agent.id],
  );
  assert.deepEqual(
    ab.b.revocations().map((r) => r.id),
    [gone.id],
  );
  assert.ok((await connect(defer, ab.b, agent)).connected);
  assert.equal(await refusedCode(ab.b, options(gone)), 5);
  assert.equal(refusal(ab.logs, gone.id), 'revoked');
  await ab.b.close();

  // With that operator no longer trusted, its records are ignored at load.
  const other = generateIdentity('operator');
  const untrusted = await authBroker(defer, { op: other, dataDir });
  assert.deepEqual(untrusted.b.admissions(), []);
  assert.equal(await refusedCode(untrusted.b, options(agent)), 5);
  assert.ok(untrusted.logs.some((l) => l.msg === 'stored record ignored'));
});

test('admin over MQTT: an operator admits and revokes with acks; non-operators cannot publish or read records', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const op = await connect(defer, ab.b, ab.op);
  assert.deepEqual(await grantedQoS(op, [topics.adminAcks(ab.op.id)]), { [topics.adminAcks(ab.op.id)]: 1 });

  // A router watching everything it may: it must never see a record.
  const router = await connect(defer, ab.b, await admitted(ab, 'router'));
  assert.deepEqual(
    await grantedQoS(router, [
      topics.adminRecords(ab.op.id),
      'mesh/v1/admin/+/records',
      'mesh/v1/admin/#',
      topics.adminAcks(ab.op.id),
      topics.allAgentStatus(),
    ]),
    {
      [topics.adminRecords(ab.op.id)]: 128,
      'mesh/v1/admin/+/records': 128,
      'mesh/v1/admin/#': 128,
      [topics.adminAcks(ab.op.id)]: 128,
      [topics.allAgentStatus()]: 1,
    },
  );
  const routerSaw = messagesDuring(router, 800);

  const agent = generateIdentity('agent');
  let ack = nextMessage(op);
  await op.publishAsync(topics.adminRecords(ab.op.id), encodeAdminRecord(admit(ab.op, agent)), { qos: 1 });
  let m = await ack;
  assert.equal(m.topic, topics.adminAcks(ab.op.id));
  assert.deepEqual(decodeAdminAck(m.payload), { v: 1, kind: 'ack', id: agent.id, ok: true });
  const device = await connect(defer, ab.b, agent);

  const closed = waitClose(device);
  ack = nextMessage(op);
  await op.publishAsync(topics.adminRecords(ab.op.id), encodeAdminRecord(revoke(ab.op, agent.id)), { qos: 1 });
  assert.deepEqual(decodeAdminAck((await ack).payload), { v: 1, kind: 'ack', id: agent.id, ok: true });
  await closed;

  // A record signed by an untrusted operator, and garbage: refused in the ack, the operator stays connected.
  const rogueSubject = generateIdentity('app');
  ack = nextMessage(op);
  await op.publishAsync(topics.adminRecords(ab.op.id), encodeAdminRecord(admit(generateIdentity('operator'), rogueSubject)), { qos: 1 });
  m = await ack;
  const refused = decodeAdminAck(m.payload);
  assert.equal(refused.ok, false);
  assert.equal(refused.code, 'MESH_UNAUTHORIZED');
  assert.equal(refused.id, rogueSubject.id);
  ack = nextMessage(op);
  await op.publishAsync(topics.adminRecords(ab.op.id), Buffer.from([0xff, 0x00, 0x13]), { qos: 1 });
  const garbage = decodeAdminAck((await ack).payload);
  assert.equal(garbage.ok, false);
  assert.equal(garbage.id, '');
  assert.ok(op.connected);

  // An app publishing a valid operator-signed record, on the operator's topic or its own: disconnected, not applied.
  const appId = await admitted(ab, 'app');
  const smuggled = generateIdentity('agent');
  for (const topic of [topics.adminRecords(ab.op.id), topics.adminRecords(appId.id)]) {
    const app = await connect(defer, ab.b, appId);
    const appClosed = waitClose(app);
    app.publish(topic, encodeAdminRecord(admit(ab.op, smuggled)), { qos: 1 });
    await appClosed;
  }
  assert.equal(await refusedCode(ab.b, options(smuggled)), 5);
  assert.equal(refusal(ab.logs, smuggled.id), 'not-admitted');
  assert.ok(!ab.b.admissions().some((a) => a.id === smuggled.id));

  // Another admitted operator (not trusted) may not read the first operator's acks, and its own records do not verify.
  const op2 = await admitted(ab, 'operator');
  const second = await connect(defer, ab.b, op2);
  assert.deepEqual(await grantedQoS(second, [topics.adminAcks(ab.op.id), topics.adminAcks(op2.id)]), {
    [topics.adminAcks(ab.op.id)]: 128,
    [topics.adminAcks(op2.id)]: 1,
  });
  ack = nextMessage(second);
  await second.publishAsync(topics.adminRecords(op2.id), encodeAdminRecord(admit(op2, smuggled)), { qos: 1 });
  assert.equal(decodeAdminAck((await ack).payload).code, 'MESH_UNAUTHORIZED');
  const opClosed = waitClose(second);
  second.publish(topics.adminRecords(ab.op.id), encodeAdminRecord(admit(ab.op, smuggled)), { qos: 1 });
  await opClosed;

  assert.deepEqual(await routerSaw, []);

  // A flood of records from one operator connection is cut off (each may cost a verify and a synced write).
  const flooder = await connect(defer, ab.b, ab.op);
  const flooderClosed = waitClose(flooder, 5000);
  for (let i = 0; i < 150; i++) flooder.publish(topics.adminRecords(ab.op.id), Buffer.from([0xa0]), { qos: 0 });
  await flooderClosed;
  assert.ok(ab.logs.some((l) => l.reason === 'admin-rate' && l.clientId === ab.op.id));
});

// ── topic ACLs ─────────────────────────────────────────────────────────────────────────────────────────────────

/** Each refused publish costs the connection, so every case gets a fresh one. */
async function publishVerdicts(
  defer: Defer,
  ab: AuthBroker,
  who: Identity,
  cases: { topic: string; retain?: boolean }[],
): Promise<Record<string, 'allowed' | 'refused'>> {
  const out: Record<string, 'allowed' | 'refused'> = {};
  for (const { topic, retain = false } of cases) {
    const c = await connect(defer, ab.b, who);
    let closed = false;
    c.on('close', () => (closed = true));
    c.publish(topic, 'x', { qos: 1, retain });
    // An allowed QoS 1 publish is acknowledged; a refused one closes the connection.
    await Promise.race([
      new Promise<void>((resolve) => c.once('packetreceive', (p) => p.cmd === 'puback' && resolve())),
      waitClose(c).then(() => undefined),
    ]);
    await new Promise((r) => setTimeout(r, 20));
    out[`${topic}${retain ? ' (retain)' : ''}`] = closed ? 'refused' : 'allowed';
    await c.endAsync(true);
  }
  return out;
}

test('ACL: an agent publishes only its own status, load and replies, and subscribes only to its own requests and cancels', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const app = await admitted(ab, 'app');
  const other = await admitted(ab, 'agent');
  const me = agent.id;

  // Watch what actually gets through.
  const router = await connect(defer, ab.b, await admitted(ab, 'router'));
  await router.subscribeAsync([topics.allAgentStatus(), topics.allAgentLoad()], { qos: 1 });
  const appClient = await connect(defer, ab.b, app);
  await appClient.subscribeAsync(topics.clientRepliesFor(app.id), { qos: 1 });
  const routerSaw: string[] = [];
  const appSaw: string[] = [];
  router.on('message', (topic) => routerSaw.push(topic));
  appClient.on('message', (topic) => appSaw.push(topic));

  const verdicts = await publishVerdicts(defer, ab, agent, [
    { topic: topics.agentStatus(me), retain: true },
    { topic: topics.agentLoad(me) },
    { topic: topics.clientReply(app.id, me) },
    { topic: topics.agentStatus(other.id), retain: true },
    { topic: topics.agentStatus(other.id) },
    { topic: topics.agentLoad(other.id) },
    { topic: topics.clientReply(app.id, other.id) },
    { topic: topics.agentRequest(other.id, me) },
    { topic: topics.agentRequest(me, me) },
    { topic: topics.agentLoad(me), retain: true },
    { topic: 'mesh/v1/agent/__proto__/status' },
    { topic: `${topics.agentStatus(me)}/extra` },
    { topic: 'sensors/temperature' },
    { topic: topics.adminRecords(me) },
  ]);
  assert.deepEqual(verdicts, {
    [`${topics.agentStatus(me)} (retain)`]: 'allowed',
    [topics.agentLoad(me)]: 'allowed',
    [topics.clientReply(app.id, me)]: 'allowed',
    [`${topics.agentStatus(other.id)} (retain)`]: 'refused',
    [topics.agentStatus(other.id)]: 'refused',
    [topics.agentLoad(other.id)]: 'refused',
    [topics.clientReply(app.id, other.id)]: 'refused',
    [topics.agentRequest(other.id, me)]: 'refused',
    [topics.agentRequest(me, me)]: 'refused',
    [`${topics.agentLoad(me)} (retain)`]: 'refused',
    'mesh/v1/agent/__proto__/status': 'refused',
    [`${topics.agentStatus(me)}/extra`]: 'refused',
    'sensors/temperature': 'refused',
    [topics.adminRecords(me)]: 'refused',
  });
  assert.ok(
    ab.logs.some((l) => l.msg === 'publish refused' && l.reason === 'acl' && l.clientId === me && l.topic === topics.agentStatus(other.id)),
  );

  const c = await connect(defer, ab.b, agent);
  assert.deepEqual(
    await grantedQoS(c, [
      topics.agentRequestsFor(me),
      topics.agentCancelsFor(me),
      topics.agentRequest(me, app.id),
      topics.agentRequestsFor(other.id),
      topics.agentCancelsFor(other.id),
      topics.clientRepliesFor(app.id),
      'mesh/v1/client/+/res/+',
      topics.allAgentStatus(),
      'mesh/v1/agent/+/req/+',
      '#',
      '+/#',
      '$SYS/#',
      'mesh/v1/#',
    ]),
    {
      [topics.agentRequestsFor(me)]: 1,
      [topics.agentCancelsFor(me)]: 1,
      [topics.agentRequest(me, app.id)]: 1,
      [topics.agentRequestsFor(other.id)]: 128,
      [topics.agentCancelsFor(other.id)]: 128,
      [topics.clientRepliesFor(app.id)]: 128,
      'mesh/v1/client/+/res/+': 128,
      [topics.allAgentStatus()]: 128,
      'mesh/v1/agent/+/req/+': 128,
      '#': 128,
      '+/#': 128,
      '$SYS/#': 128,
      'mesh/v1/#': 128,
    },
  );
  assert.ok(c.connected, 'refused subscriptions do not cost the connection');

  // Only the allowed publishes were delivered (and the retained store holds only the agent's own status).
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(routerSaw.sort(), [topics.agentLoad(me), topics.agentStatus(me)].sort());
  assert.deepEqual(appSaw, [topics.clientReply(app.id, me)]);
  const viewer = await connect(defer, ab.b, await admitted(ab, 'router'));
  const retained = messagesDuring(viewer, 300);
  await viewer.subscribeAsync(topics.allAgentStatus(), { qos: 1 });
  assert.deepEqual(
    (await retained).map((m) => m.topic),
    [topics.agentStatus(me)],
  );
});

test('ACL: apps, bridges and routers send requests and cancels only in their own name and read only their own replies', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const a = agent.id;
  for (const role of ['app', 'bridge', 'router'] as const) {
    const who = await admitted(ab, role);
    const someoneElse = await admitted(ab, 'app');
    const me = who.id;
    const verdicts = await publishVerdicts(defer, ab, who, [
      { topic: topics.agentRequest(a, me) },
      { topic: topics.agentCancel(a, me) },
      { topic: topics.agentRequest(a, someoneElse.id) },
      { topic: topics.agentCancel(a, someoneElse.id) },
      { topic: topics.agentRequest('not valid!', me) },
      { topic: topics.clientReply(someoneElse.id, a) },
      { topic: topics.clientReply(me, a) },
      { topic: topics.agentStatus(a) },
      { topic: topics.agentLoad(a) },
      { topic: topics.agentStatus(me), retain: true },
      { topic: topics.adminRecords(me) },
    ]);
    assert.deepEqual(
      verdicts,
      {
        [topics.agentRequest(a, me)]: 'allowed',
        [topics.agentCancel(a, me)]: 'allowed',
        [topics.agentRequest(a, someoneElse.id)]: 'refused',
        [topics.agentCancel(a, someoneElse.id)]: 'refused',
        [topics.agentRequest('not valid!', me)]: 'refused',
        [topics.clientReply(someoneElse.id, a)]: 'refused',
        [topics.clientReply(me, a)]: 'refused',
        [topics.agentStatus(a)]: 'refused',
        [topics.agentLoad(a)]: 'refused',
        [`${topics.agentStatus(me)} (retain)`]: 'refused',
        [topics.adminRecords(me)]: 'refused',
      },
      role,
    );

    const c = await connect(defer, ab.b, who);
    assert.deepEqual(
      await grantedQoS(c, [
        topics.clientRepliesFor(me),
        topics.clientReply(me, a),
        topics.allAgentStatus(),
        topics.allAgentLoad(),
        topics.agentStatus(a),
        topics.clientRepliesFor(someoneElse.id),
        'mesh/v1/client/+/res/+',
        topics.agentRequestsFor(a),
        'mesh/v1/agent/+/req/+',
        'mesh/v1/agent/+/+',
        topics.adminAcks(me),
        '#',
        '$SYS/#',
      ]),
      {
        [topics.clientRepliesFor(me)]: 1,
        [topics.clientReply(me, a)]: 1,
        [topics.allAgentStatus()]: 1,
        [topics.allAgentLoad()]: 1,
        [topics.agentStatus(a)]: 1,
        [topics.clientRepliesFor(someoneElse.id)]: 128,
        'mesh/v1/client/+/res/+': 128,
        [topics.agentRequestsFor(a)]: 128,
        'mesh/v1/agent/+/req/+': 128,
        'mesh/v1/agent/+/+': 128,
        [topics.adminAcks(me)]: 128,
        '#': 128,
        '$SYS/#': 128,
      },
      role,
    );
  }
});

test("ACL: route requests go to a router only in the sender's own name; only a router answers with leases, and only in its own name", {
  timeout: 30_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const router = await admitted(ab, 'router');
  const r = router.id;
  const agent = await admitted(ab, 'agent');
  for (const role of ['app', 'bridge', 'router', 'agent'] as const) {
    const who = role === 'agent' ? agent : role === 'router' ? await admitted(ab, 'router') : await admitted(ab, role);
    const other = await admitted(ab, 'app');
    const me = who.id;
    const verdicts = await publishVerdicts(defer, ab, who, [
      { topic: topics.routerRoute(r, me) },
      { topic: topics.routerRoute(r, other.id) },
      { topic: topics.clientLease(other.id, me) },
      { topic: topics.clientLease(other.id, r) },
    ]);
    const sender = role !== 'agent';
    assert.deepEqual(
      verdicts,
      {
        [topics.routerRoute(r, me)]: sender ? 'allowed' : 'refused',
        [topics.routerRoute(r, other.id)]: 'refused',
        [topics.clientLease(other.id, me)]: role === 'router' ? 'allowed' : 'refused',
        [topics.clientLease(other.id, r)]: 'refused',
      },
      role,
    );
    const c = await connect(defer, ab.b, who);
    assert.deepEqual(
      await grantedQoS(c, [
        topics.clientLeasesFor(me),
        topics.clientLeasesFor(other.id),
        topics.routerRoutesFor(me),
        topics.routerRoutesFor(r),
        'mesh/v1/router/+/route/+',
      ]),
      {
        [topics.clientLeasesFor(me)]: sender ? 1 : 128,
        [topics.clientLeasesFor(other.id)]: 128,
        [topics.routerRoutesFor(me)]: role === 'router' ? 1 : 128,
        [topics.routerRoutesFor(r)]: 128,
        'mesh/v1/router/+/route/+': 128,
      },
      role,
    );
  }
});

test("ACL: apps, routers, bridges and operators read every device's availability and telemetry; agents neither", {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const filters = [topics.allDeviceAvailability(), topics.allDeviceTelemetry()];
  for (const role of ['app', 'router', 'bridge', 'operator'] as const) {
    const c = await connect(defer, ab.b, role === 'operator' ? ab.op : await admitted(ab, role));
    // The telemetry filter was once refused to every role, while the docs and the mosquitto ACL granted it.
    assert.deepEqual(await grantedQoS(c, filters), { [filters[0]!]: 1, [filters[1]!]: 1 }, role);
  }
  const agent = await connect(defer, ab.b, await admitted(ab, 'agent'));
  assert.deepEqual(await grantedQoS(agent, filters), { [filters[0]!]: 128, [filters[1]!]: 128 });

  // A bridge's telemetry reaches an app subscribed to the wildcard.
  const bridge = await admitted(ab, 'bridge');
  const app = await connect(defer, ab.b, await admitted(ab, 'app'));
  await app.subscribeAsync(topics.allDeviceTelemetry(), { qos: 0 });
  const got = nextMessage(app);
  const b = await connect(defer, ab.b, bridge);
  await b.publishAsync(topics.deviceTelemetry(bridge.id, 'dev-0000abcd'), 'reading', { qos: 0 });
  const m = await got;
  assert.deepEqual([m.topic, m.payload.toString()], [topics.deviceTelemetry(bridge.id, 'dev-0000abcd'), 'reading']);
});

test('ACL: an operator publishes only its own admin records and subscribes to status, load and its own acks', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const me = ab.op.id;
  const verdicts = await publishVerdicts(defer, ab, ab.op, [
    { topic: topics.adminRecords(me) },
    { topic: topics.adminAcks(me) },
    { topic: topics.agentRequest(agent.id, me) },
    { topic: topics.agentStatus(agent.id) },
    { topic: topics.clientReply(me, agent.id) },
  ]);
  assert.deepEqual(verdicts, {
    [topics.adminRecords(me)]: 'allowed',
    [topics.adminAcks(me)]: 'refused',
    [topics.agentRequest(agent.id, me)]: 'refused',
    [topics.agentStatus(agent.id)]: 'refused',
    [topics.clientReply(me, agent.id)]: 'refused',
  });
  const c = await connect(defer, ab.b, ab.op);
  assert.deepEqual(
    await grantedQoS(c, [
      topics.allAgentStatus(),
      topics.allAgentLoad(),
      topics.adminAcks(me),
      topics.agentRequestsFor(agent.id),
      topics.clientRepliesFor(me),
      '#',
    ]),
    {
      [topics.allAgentStatus()]: 1,
      [topics.allAgentLoad()]: 1,
      [topics.adminAcks(me)]: 1,
      [topics.agentRequestsFor(agent.id)]: 128,
      [topics.clientRepliesFor(me)]: 128,
      '#': 128,
    },
  );
});

test("wills: an agent's will must be its own status; other roles may not set one", { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const other = await admitted(ab, 'agent');
  const app = await admitted(ab, 'app');
  const will = (topic: string) => ({ will: { topic, payload: Buffer.from('offline'), qos: 1 as const, retain: true } });
  assert.equal(await refusedCode(ab.b, options(agent, will(topics.agentStatus(other.id)))), 5);
  assert.equal(refusal(ab.logs, agent.id), 'will-not-own-status');
  assert.equal(await refusedCode(ab.b, options(app, will(topics.agentStatus(app.id)))), 5);
  assert.equal(refusal(ab.logs, app.id), 'will-not-agent');
  const c = await connect(defer, ab.b, agent, will(topics.agentStatus(agent.id)));
  assert.ok(c.connected);
});

test('raw CONNECT with a valid token over a plain socket gets CONNACK 0 (the token is the whole password)', {
  timeout: 5000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const agent = await admitted(ab, 'agent');
  const socket = net.connect(ab.b.port, '127.0.0.1');
  defer(() => socket.destroy());
  await once(socket, 'connect');
  const token = makeConnectToken(agent);
  const body = Buffer.concat([
    str(Buffer.from('MQTT')),
    Buffer.from([4, 0x02 | 0x80 | 0x40, 0, 30]),
    str(Buffer.from(agent.id)),
    str(Buffer.from(agent.id)),
    str(token),
  ]);
  assert.ok(body.length > 127 && body.length < 16_384);
  socket.write(Buffer.concat([Buffer.from([0x10, (body.length & 0x7f) | 0x80, body.length >> 7]), body]));
  const [data] = (await Promise.race([
    once(socket, 'data'),
    new Promise((_, reject) => setTimeout(() => reject(new Error('no CONNACK')), 2000)),
  ])) as [Buffer];
  assert.deepEqual([...data.subarray(0, 4)], [0x20, 0x02, 0x00, 0x00]);
});

// ── configuration and building blocks ─────────────────────────────────────────────────────────────────────────

test('auth options are validated, and a data folder held by a running broker cannot be opened twice', { timeout: 20_000 }, async (t) => {
  const defer = cleanup(t);
  const op = generateIdentity('operator');
  const agent = generateIdentity('agent');
  await assert.rejects(
    startBroker({
      port: 0,
      auth: {
        trustedOperators: [
          { id: agent.id, publicKey: agent.publicKey },
          { id: op.id, publicKey: agent.publicKey },
        ],
        dataDir: '',
        maxClockSkewMs: 60_000,
        nonceTtlMs: 60_000,
      },
    }),
    (err: unknown) => {
      assert.ok(err instanceof MeshError);
      assert.equal(err.code, 'MESH_CONFIG');
      assert.deepEqual(err.details?.fields, ['auth.trustedOperators[0]', 'auth.trustedOperators[1]', 'auth.dataDir', 'auth.nonceTtlMs']);
      return true;
    },
  );
  await assert.rejects(
    startBroker({ port: 0, auth: { trustedOperators: [], dataDir: '/tmp/x' } }),
    (err: unknown) => err instanceof MeshError && /trustedOperators/.test(err.message),
  );
  const ab = await authBroker(defer, { op });
  await assert.rejects(
    startBroker({ port: 0, auth: { trustedOperators: [{ id: op.id, publicKey: op.publicKey }], dataDir: ab.dataDir } }),
    (err: unknown) => err instanceof MeshError && err.code === 'MESH_CONFIG' && /admission store/.test(err.message),
  );
});

test('IpGuard and NonceCache: buckets refill, limits expire, idle state and old nonces are forgotten', () => {
  const g = new IpGuard({
    maxConnectionsPerIp: 2,
    connectRatePerIp: 10,
    connectBurstPerIp: 3,
    addressFailuresBeforeLimit: 3,
    authFailuresBeforeBan: 3,
    authFailureWindowMs: 1000,
    banMs: 5000,
  });
  assert.deepEqual(
    [g.connect('a', 0), g.connect('a', 0), g.connect('a', 0), g.connect('a', 0), g.connect('a', 1), g.connect('a', 100)],
    ['ok', 'ok', 'ok', 'connect-rate', 'connect-rate-again', 'ok'],
  );
  // Failures spread beyond the window do not limit; three within it do, for banMs.
  assert.equal(g.failure('c', 0), false);
  assert.equal(g.failure('c', 2000), false);
  assert.equal(g.failure('c', 2100), false);
  assert.equal(g.failure('c', 2200), true);
  assert.equal(g.isLimited('c', 2300), true);
  assert.equal(g.connect('c', 7199), 'limited');
  assert.equal(g.connect('c', 7201), 'ok');
  g.sweep(100_000);
  assert.equal(g.size, 0);

  const n = new NonceCache(1000);
  n.add('x', 0);
  n.add('y', 500);
  assert.equal(n.has('x', 999), true);
  assert.equal(n.has('x', 1000), false);
  assert.equal(n.has('y', 1000), true);
  assert.equal(n.size, 1);
});
