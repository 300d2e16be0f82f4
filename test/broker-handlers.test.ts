/**
 * The broker's decision modules (broker/src/handlers/) called directly, without a socket or aedes: tables of
 * packets, sessions and state, and the allow or refuse (with its reason) each one must get. The admission store is a
 * real one in a temp folder; the per-address guard and nonce cache are the broker's own classes.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  admit,
  encodeMessage,
  generateIdentity,
  type Identity,
  MAX_TOPIC_BYTES,
  MAX_TOPIC_LEVELS,
  makeConnectToken,
  revoke,
  topics,
} from '@edge-mesh/protocol';
import { pino } from 'pino';
import { ADMIN_RECORD_BURST, newSession } from '../broker/src/acl.ts';
import { applyAdminRecord, encodeAdminRecord, MAX_ADMIN_RECORD_BYTES } from '../broker/src/admin.ts';
import {
  CONNACK_IDENTIFIER_REJECTED,
  CONNACK_NOT_AUTHORIZED,
  type ConnectFields,
  type ConnectPolicy,
  checkConnect,
  doorVerdict,
  limitRefusal,
  namesAdmittedId,
  stillAdmitted,
  verifyConnect,
} from '../broker/src/handlers/connect.ts';
import { decidePublish, type PublishContext } from '../broker/src/handlers/publish.ts';
import { decideSubscribe, grantedQos, releaseSubscriptions, takeSubscription } from '../broker/src/handlers/subscribe.ts';
import { checkWillPolicy, orphanWillAllowed, willRoleRefusal } from '../broker/src/handlers/will.ts';
import { ClientGuard, IpGuard, NonceCache } from '../broker/src/limits.ts';
import { AdmissionStore } from '../broker/src/store.ts';
import { cleanup, tempDir } from './broker-fixtures.ts';

const limits = { maxTopicLevels: MAX_TOPIC_LEVELS, maxTopicBytes: MAX_TOPIC_BYTES };
const OPEN: ConnectPolicy = { maxClientIdLength: 64, keepaliveLimitS: 300, limits, auth: undefined };
const AUTH: ConnectPolicy = { ...OPEN, auth: { maxClockSkewMs: 60_000 } };
const quiet = pino({ level: 'silent' });

/** A verdict reduced to what the table states: ok, or the reason, its registry code and CONNACK code (and will topic). */
function outcome(v: { ok: true } | { ok: false; reason: string; code: string; returnCode?: number; topic?: string | undefined }): unknown {
  if (v.ok) return 'ok';
  return v.topic === undefined ? [v.reason, v.code, v.returnCode] : [v.reason, v.code, v.returnCode, v.topic];
}

describe('CONNECT decisions', () => {
  test('checkConnect: the cheap checks, open and authenticated mode', () => {
    const agent = generateIdentity('agent');
    const app = generateIdentity('app');
    const now = Date.now();
    const token = (who: Identity, at = now) => makeConnectToken(who, at);
    const own = topics.agentStatus(agent.id);
    const cases: [string, ConnectPolicy, ConnectFields, unknown][] = [
      ['a plain open-mode CONNECT', OPEN, { clientId: 'agent-one', keepalive: 60 }, 'ok'],
      ['an empty id in open mode', OPEN, { clientId: '', keepalive: 60 }, 'ok'],
      [
        'an id over the cap',
        OPEN,
        { clientId: 'x'.repeat(65), keepalive: 60 },
        ['client-id-too-long', 'MESH_TOO_LARGE', CONNACK_IDENTIFIER_REJECTED],
      ],
      [
        'a 65-byte user name',
        OPEN,
        { clientId: 'a1b', username: 'u'.repeat(65), keepalive: 60 },
        ['username-too-long', 'MESH_TOO_LARGE', 5],
      ],
      [
        '33 two-byte characters (66 bytes)',
        OPEN,
        { clientId: 'a1b', username: 'é'.repeat(33), keepalive: 60 },
        ['username-too-long', 'MESH_TOO_LARGE', 5],
      ],
      [
        'a 129-byte password',
        OPEN,
        { clientId: 'a1b', password: Buffer.alloc(129), keepalive: 60 },
        ['password-too-long', 'MESH_TOO_LARGE', 5],
      ],
      ['clean = false', OPEN, { clientId: 'a1b', clean: false, keepalive: 60 }, ['persistent-session', 'MESH_BAD_REQUEST', 5]],
      ['keepalive 0', OPEN, { clientId: 'a1b', keepalive: 0 }, ['keepalive-zero', 'MESH_BAD_REQUEST', 5]],
      ['keepalive over the limit', OPEN, { clientId: 'a1b', keepalive: 301 }, ['keepalive-too-long', 'MESH_BAD_REQUEST', 5]],
      ['keepalive 0 with the limit off', { ...OPEN, keepaliveLimitS: 0 }, { clientId: 'a1b', keepalive: 0 }, 'ok'],
      ['a will on its own status', OPEN, { clientId: 'agent-one', keepalive: 60, will: { topic: topics.agentStatus('agent-one') } }, 'ok'],
      [
        "a will on another's status",
        OPEN,
        { clientId: 'agent-one', keepalive: 60, will: { topic: topics.agentStatus('agent-two') } },
        ['will-not-own-status', 'MESH_FORBIDDEN', 5, topics.agentStatus('agent-two')],
      ],
      [
        'a QoS 2 will',
        OPEN,
        { clientId: 'agent-one', keepalive: 60, will: { topic: topics.agentStatus('agent-one'), qos: 2 } },
        ['will-qos2', 'MESH_BAD_REQUEST', 5, topics.agentStatus('agent-one')],
      ],
      [
        'auth: an id not derived from a key',
        AUTH,
        { clientId: 'agent-one', keepalive: 60 },
        ['id-not-key-derived', 'MESH_UNAUTHORIZED', 2],
      ],
      ['auth: no token', AUTH, { clientId: agent.id, keepalive: 60 }, ['no-token', 'MESH_UNAUTHORIZED', 5]],
      [
        'auth: an empty password',
        AUTH,
        { clientId: agent.id, password: Buffer.alloc(0), keepalive: 60 },
        ['no-token', 'MESH_UNAUTHORIZED', 5],
      ],
      [
        'auth: a password that is no token',
        AUTH,
        { clientId: agent.id, password: Buffer.alloc(50, 1), keepalive: 60 },
        ['bad-token', 'MESH_UNAUTHORIZED', 5],
      ],
      [
        'auth: a token two minutes old',
        AUTH,
        { clientId: agent.id, password: token(agent, now - 120_000), keepalive: 60 },
        ['stale-token', 'MESH_UNAUTHORIZED', 5],
      ],
      [
        'auth: a user name that is not the id',
        AUTH,
        { clientId: agent.id, username: app.id, password: token(agent), keepalive: 60 },
        ['username-not-client-id', 'MESH_UNAUTHORIZED', 5],
      ],
      [
        'auth: an app with a will',
        AUTH,
        { clientId: app.id, password: token(app), keepalive: 60, will: { topic: own } },
        ['will-not-own-status', 'MESH_FORBIDDEN', 5, own],
      ],
      [
        'auth: an app with a will on its own status',
        AUTH,
        { clientId: app.id, password: token(app), keepalive: 60, will: { topic: topics.agentStatus(app.id) } },
        ['will-not-agent', 'MESH_FORBIDDEN', 5, topics.agentStatus(app.id)],
      ],
      [
        'auth: an agent with its own will and a token',
        AUTH,
        { clientId: agent.id, password: token(agent), keepalive: 60, will: { topic: own } },
        'ok',
      ],
      ['auth: user name equal to the id', AUTH, { clientId: agent.id, username: agent.id, password: token(agent), keepalive: 60 }, 'ok'],
    ];
    for (const [name, policy, packet, expected] of cases) {
      assert.deepEqual(outcome(checkConnect(packet, policy, now)), expected, name);
    }
    const ok = checkConnect({ clientId: agent.id, password: token(agent), keepalive: 60 }, AUTH, now);
    assert.ok(ok.ok && ok.token !== undefined && ok.token.timestampMs === now, 'the token to verify is handed on');
    const open = checkConnect({ clientId: 'a1b', keepalive: 60 }, OPEN, now);
    assert.ok(open.ok && open.token === undefined, 'open mode verifies nothing');
  });

  const LIMITS = {
    maxConnectionsPerIp: 10,
    connectRatePerIp: 1,
    connectBurstPerIp: 2,
    addressFailuresBeforeLimit: 2,
    authFailuresBeforeBan: 2,
    authFailureWindowMs: 10_000,
    banMs: 60_000,
  };

  test('doorVerdict: the address limit and CONNECT bucket are noted, not acted on; then MQTT 3.1.1 only', () => {
    const ips = new IpGuard(LIMITS);
    const t0 = 1_000_000;
    const wrong = (limited?: string) => ({ action: 'wrong-version', reason: 'protocol-version', code: 'MESH_BAD_REQUEST', limited });
    const seq: [string, number | undefined, number, unknown][] = [
      ['10.0.0.1', 4, t0, { action: 'go', limited: undefined }],
      ['10.0.0.1', 3, t0, wrong()],
      ['10.0.0.1', 4, t0, { action: 'go', limited: 'connect-rate', quiet: false }],
      ['10.0.0.1', 4, t0, { action: 'go', limited: 'connect-rate', quiet: true }],
      // Another level over the rate: still refused for its level, and it says the rate already holds.
      ['10.0.0.1', 3, t0, wrong('connect-rate')],
      ['10.0.0.2', 5, t0, wrong()],
      ['10.0.0.2', undefined, t0, wrong()],
      ['10.0.0.1', 4, t0 + 1_000, { action: 'go', limited: undefined }],
    ];
    for (const [ip, version, now, expected] of seq)
      assert.deepEqual(doorVerdict(ips, ip, version, now), expected, `${ip} v${version} @${now}`);
    ips.failure('10.0.0.3', t0);
    assert.ok(ips.failure('10.0.0.3', t0), 'the second unauthenticated refusal limits the address');
    assert.deepEqual(doorVerdict(ips, '10.0.0.3', 4, t0 + 1), { action: 'go', limited: 'address-limited', quiet: true });
    assert.deepEqual(doorVerdict(ips, '10.0.0.3', 3, t0 + 1), wrong('address-limited'));
    assert.deepEqual(doorVerdict(ips, '10.0.0.3', 4, t0 + 60_001), { action: 'go', limited: undefined });
  });

  test('limitRefusal: a limited address lets admitted ids through; failed tokens ban the (id, address) pair only', async (t) => {
    const defer = cleanup(t);
    const op = generateIdentity('operator');
    const store = await AdmissionStore.open(await tempDir(defer, 'mesh-limits-'), new Map([[op.id, op.publicKey]]), quiet);
    defer(() => store.close());
    const agent = generateIdentity('agent');
    const stranger = generateIdentity('agent');
    await store.admit(admit(op, agent));
    const clients = new ClientGuard(LIMITS);
    const now = Date.now();
    const reasonOf = (r: ReturnType<typeof limitRefusal>) => (r === undefined ? 'go' : [r.reason, r.code, r.returnCode]);
    // Not limited: everyone goes on to the usual checks.
    assert.equal(reasonOf(limitRefusal(false, stranger.id, '10.0.0.1', clients, store, now)), 'go');
    assert.equal(reasonOf(limitRefusal(false, 'garbage', '10.0.0.1', clients, store, now)), 'go');
    // A limited address: only the admitted id goes on.
    assert.equal(reasonOf(limitRefusal(true, agent.id, '10.0.0.1', clients, store, now)), 'go');
    assert.deepEqual(reasonOf(limitRefusal(true, stranger.id, '10.0.0.1', clients, store, now)), [
      'address-limited',
      'MESH_RATE_LIMITED',
      3,
    ]);
    assert.deepEqual(reasonOf(limitRefusal(true, 'garbage', '10.0.0.1', clients, store, now)), ['address-limited', 'MESH_RATE_LIMITED', 3]);
    // Open mode has no identities: a limited address is refused.
    assert.deepEqual(reasonOf(limitRefusal(true, 'agent-one', '10.0.0.1', clients, undefined, now)), [
      'address-limited',
      'MESH_RATE_LIMITED',
      3,
    ]);
    // Failed tokens for the admitted id from one address ban that pair, and nothing else.
    assert.equal(namesAdmittedId(agent.id, store, now), true);
    assert.equal(namesAdmittedId(stranger.id, store, now), false);
    assert.equal(clients.failure('10.0.0.1', agent.id, now), false);
    assert.equal(clients.failure('10.0.0.1', agent.id, now), true);
    assert.deepEqual(reasonOf(limitRefusal(false, agent.id, '10.0.0.1', clients, store, now + 1)), [
      'client-limited',
      'MESH_RATE_LIMITED',
      3,
    ]);
    assert.equal(reasonOf(limitRefusal(false, agent.id, '10.0.0.2', clients, store, now + 1)), 'go', 'the same id from elsewhere');
    assert.equal(reasonOf(limitRefusal(false, agent.id, '10.0.0.1', clients, store, now + 60_001)), 'go', 'the ban ends');
    clients.sweep(now + 200_000);
    assert.equal(clients.size, 0);
  });

  test('verifyConnect and stillAdmitted against a real admission store', async (t) => {
    const defer = cleanup(t);
    const op = generateIdentity('operator');
    const store = await AdmissionStore.open(await tempDir(defer, 'mesh-handlers-'), new Map([[op.id, op.publicKey]]), quiet);
    defer(() => store.close());
    const agent = generateIdentity('agent');
    const stranger = generateIdentity('agent');
    const admission = await store.admit(admit(op, agent));
    const nonces = new NonceCache(120_000);
    const now = Date.now();
    const tokenOf = (who: Identity, signer = who, nonce?: Buffer) => {
      const check = checkConnect(
        { clientId: who.id, password: makeConnectToken({ ...who, privateKey: signer.privateKey }, now, nonce), keepalive: 60 },
        AUTH,
        now,
      );
      assert.ok(check.ok);
      return check.token;
    };

    // Open mode: a session without a role (no ACL) and no expiry.
    const open = verifyConnect('agent-one', undefined, undefined, nonces, now, 7);
    assert.ok(open.ok);
    assert.deepEqual(
      [open.session.id, open.session.role, open.session.expires, open.session.tokens],
      ['agent-one', undefined, Infinity, 7],
    );

    const cases: [string, ReturnType<typeof verifyConnect>, unknown][] = [
      ['no token', verifyConnect(agent.id, undefined, store, nonces, now, 7), ['no-token', 'MESH_UNAUTHORIZED', CONNACK_NOT_AUTHORIZED]],
      [
        'an id never admitted',
        verifyConnect(stranger.id, tokenOf(stranger), store, nonces, now, 7),
        ['not-admitted', 'MESH_UNAUTHORIZED', 5],
      ],
      [
        'signed by another key',
        verifyConnect(agent.id, tokenOf(agent, stranger, Buffer.alloc(16, 9)), store, nonces, now, 7),
        ['bad-signature', 'MESH_UNAUTHORIZED', 5],
      ],
      // The forged token above did not burn its nonce: the genuine token with the same nonce passes.
      ['the genuine token', verifyConnect(agent.id, tokenOf(agent, agent, Buffer.alloc(16, 9)), store, nonces, now, 7), 'ok'],
      [
        'the same token again',
        verifyConnect(agent.id, tokenOf(agent, agent, Buffer.alloc(16, 9)), store, nonces, now, 7),
        ['replayed-token', 'MESH_UNAUTHORIZED', 5],
      ],
    ];
    for (const [name, verdict, expected] of cases) assert.deepEqual(outcome(verdict), expected, name);
    const good = verifyConnect(agent.id, tokenOf(agent), store, nonces, now, 7);
    assert.ok(good.ok);
    assert.deepEqual([good.session.role, good.session.expires], ['agent', admission.expires]);

    assert.equal(stillAdmitted(undefined, 'agent-one', now), true, 'open mode cuts no one off');
    assert.equal(stillAdmitted(store, agent.id, now), true);
    assert.equal(stillAdmitted(store, op.id, now), true, 'trusted operators are admitted implicitly');
    assert.equal(stillAdmitted(store, stranger.id, now), false);
    await store.revoke(revoke(op, agent.id, now + 1));
    assert.equal(stillAdmitted(store, agent.id, now + 2), false);
    assert.deepEqual(outcome(verifyConnect(agent.id, tokenOf(agent), store, nonces, now + 2, 7)), ['revoked', 'MESH_UNAUTHORIZED', 5]);
  });
});

describe('PUBLISH decisions', () => {
  const agent = generateIdentity('agent');
  const app = generateIdentity('app');
  const op = generateIdentity('operator');
  const ctx = (over: Partial<PublishContext>): PublishContext => ({
    ownerId: 'agent-one',
    session: newSession('agent-one', undefined, Infinity, 100),
    orphanWill: false,
    ownWill: false,
    auth: false,
    limits,
    ratePerMs: 0,
    burst: 100,
    now: Date.now(),
    ...over,
  });
  const authed = (who: Identity, over: Partial<PublishContext> = {}) =>
    ctx({ ownerId: who.id, session: newSession(who.id, who.role, Infinity, 100), auth: true, ...over });

  test('topic policy, ACL, orphaned wills: a table', () => {
    const cases: [string, { topic: string; qos?: number; retain?: boolean }, PublishContext, unknown][] = [
      ['open mode, any topic', { topic: 'a/b', qos: 1 }, ctx({}), { ok: true, admin: false }],
      ['QoS 2', { topic: 'a/b', qos: 2 }, ctx({}), { ok: false, reason: 'qos2', code: 'MESH_BAD_REQUEST' }],
      ['$SYS', { topic: '$SYS/x' }, ctx({}), { ok: false, reason: 'reserved-topic', code: 'MESH_FORBIDDEN' }],
      ['a wildcard', { topic: 'a/+' }, ctx({}), { ok: false, reason: 'wildcard-in-topic', code: 'MESH_BAD_REQUEST' }],
      ['an empty topic', { topic: '' }, ctx({}), { ok: false, reason: 'empty-topic', code: 'MESH_BAD_REQUEST' }],
      ['NUL', { topic: 'a\u0000b' }, ctx({}), { ok: false, reason: 'nul-in-topic', code: 'MESH_BAD_REQUEST' }],
      ['ill-formed UTF-8', { topic: 'a/\ufffd' }, ctx({}), { ok: false, reason: 'invalid-utf8', code: 'MESH_BAD_REQUEST' }],
      [
        'too deep',
        { topic: `${'a/'.repeat(MAX_TOPIC_LEVELS)}z` },
        ctx({}),
        { ok: false, reason: 'too-many-levels', code: 'MESH_BAD_REQUEST' },
      ],
      ['too long', { topic: 'a'.repeat(MAX_TOPIC_BYTES + 1) }, ctx({}), { ok: false, reason: 'topic-too-long', code: 'MESH_TOO_LARGE' }],
      [
        'retained, not own status',
        { topic: 'a/b', retain: true },
        ctx({}),
        { ok: false, reason: 'retain-not-own-status', code: 'MESH_FORBIDDEN' },
      ],
      ['retained own status', { topic: topics.agentStatus('agent-one'), retain: true }, ctx({}), { ok: true, admin: false }],
      ['auth: own status', { topic: topics.agentStatus(agent.id), retain: true }, authed(agent), { ok: true, admin: false }],
      [
        "auth: another agent's status",
        { topic: topics.agentStatus(app.id) },
        authed(agent),
        { ok: false, reason: 'acl', code: 'MESH_FORBIDDEN' },
      ],
      ['auth: a request in its own name', { topic: topics.agentRequest(agent.id, app.id) }, authed(app), { ok: true, admin: false }],
      [
        "auth: a request in another's name",
        { topic: topics.agentRequest(agent.id, op.id) },
        authed(app),
        { ok: false, reason: 'acl', code: 'MESH_FORBIDDEN' },
      ],
      ['auth: an admin record', { topic: topics.adminRecords(op.id), qos: 1 }, authed(op), { ok: true, admin: true }],
      [
        "auth: another operator's records",
        { topic: topics.adminRecords(generateIdentity('operator').id) },
        authed(op),
        { ok: false, reason: 'acl', code: 'MESH_FORBIDDEN' },
      ],
      [
        'auth: a client without a session',
        { topic: topics.agentStatus(agent.id) },
        authed(agent, { session: undefined }),
        { ok: false, reason: 'acl', code: 'MESH_FORBIDDEN' },
      ],
      [
        "auth: an orphaned will, its agent's status",
        { topic: topics.agentStatus(agent.id), retain: true },
        authed(agent, { session: undefined, orphanWill: true }),
        { ok: true, admin: false },
      ],
      [
        "auth: an orphaned will, an app's status",
        { topic: topics.agentStatus(app.id) },
        authed(app, { session: undefined, orphanWill: true }),
        { ok: false, reason: 'acl', code: 'MESH_FORBIDDEN' },
      ],
      [
        'open: an orphaned will',
        { topic: topics.agentStatus('agent-one') },
        ctx({ session: undefined, orphanWill: true }),
        { ok: true, admin: false },
      ],
    ];
    for (const [name, packet, c, expected] of cases) assert.deepEqual(decidePublish(packet, c), expected, name);
  });

  test('the publish bucket refills at its rate and spares the own will; admin records have their own bucket', () => {
    const session = newSession('agent-one', undefined, Infinity, 2);
    const t0 = session.last;
    const c = (now: number, ownWill = false) => ctx({ session, burst: 2, ratePerMs: 0.001, now, ownWill });
    const verdicts = [t0, t0, t0].map((now) => decidePublish({ topic: 'a/b' }, c(now)));
    assert.deepEqual(verdicts, [
      { ok: true, admin: false },
      { ok: true, admin: false },
      { ok: false, reason: 'publish-rate', code: 'MESH_RATE_LIMITED' },
    ]);
    assert.deepEqual(decidePublish({ topic: 'a/b' }, c(t0, true)), { ok: true, admin: false }, 'the own will is never rate limited');
    assert.deepEqual(decidePublish({ topic: 'a/b' }, c(t0 + 1_000)), { ok: true, admin: false }, 'one token back after a second');
    assert.deepEqual(decidePublish({ topic: 'a/b' }, c(t0 + 1_000)), { ok: false, reason: 'publish-rate', code: 'MESH_RATE_LIMITED' });

    const opSession = newSession(op.id, 'operator', Infinity, 1_000_000);
    const now = opSession.adminLast;
    const record = { topic: topics.adminRecords(op.id), qos: 1 };
    const opCtx = ctx({ ownerId: op.id, session: opSession, auth: true, burst: 1_000_000, now });
    for (let i = 0; i < ADMIN_RECORD_BURST; i++) assert.deepEqual(decidePublish(record, opCtx), { ok: true, admin: true });
    assert.deepEqual(decidePublish(record, opCtx), { ok: false, reason: 'admin-rate', code: 'MESH_RATE_LIMITED' });
  });
});

describe('SUBSCRIBE and will decisions', () => {
  test('filters: policy, ACL and the granted QoS', () => {
    const agent = generateIdentity('agent');
    const app = generateIdentity('app');
    const open = newSession('agent-one', undefined, Infinity, 10);
    const agentSession = newSession(agent.id, 'agent', Infinity, 10);
    const appSession = newSession(app.id, 'app', Infinity, 10);
    const cases: [string, string, number, ReturnType<typeof newSession> | undefined, boolean, unknown][] = [
      ['open: a plain filter', 'a/+', 1, open, false, { ok: true, qos: 1 }],
      ['open: QoS 2 is granted as 1', 'a/+', 2, open, false, { ok: true, qos: 1 }],
      ['open: QoS 0 stays 0', 'a/#', 0, open, false, { ok: true, qos: 0 }],
      ['#', '#', 1, open, false, { ok: false, reason: 'wildcard-all', code: 'MESH_FORBIDDEN' }],
      ['+/#', '+/#', 1, open, false, { ok: false, reason: 'wildcard-all', code: 'MESH_FORBIDDEN' }],
      ['+/+/#', '+/+/#', 1, open, false, { ok: false, reason: 'wildcard-all', code: 'MESH_FORBIDDEN' }],
      ['$SYS/#', '$SYS/#', 1, open, false, { ok: false, reason: 'reserved-topic', code: 'MESH_FORBIDDEN' }],
      ['too deep', `${'a/'.repeat(MAX_TOPIC_LEVELS)}#`, 1, open, false, { ok: false, reason: 'too-many-levels', code: 'MESH_BAD_REQUEST' }],
      ['auth: its own requests', topics.agentRequestsFor(agent.id), 2, agentSession, true, { ok: true, qos: 1 }],
      [
        "auth: another agent's requests",
        topics.agentRequestsFor(app.id),
        1,
        agentSession,
        true,
        { ok: false, reason: 'acl', code: 'MESH_FORBIDDEN' },
      ],
      ['auth: an app reads every status', topics.allAgentStatus(), 1, appSession, true, { ok: true, qos: 1 }],
      [
        "auth: an app reads another's replies",
        topics.clientRepliesFor(agent.id),
        1,
        appSession,
        true,
        { ok: false, reason: 'acl', code: 'MESH_FORBIDDEN' },
      ],
      ['auth: no session', topics.allAgentStatus(), 1, undefined, true, { ok: false, reason: 'acl', code: 'MESH_FORBIDDEN' }],
    ];
    for (const [name, filter, qos, session, auth, expected] of cases) {
      assert.deepEqual(decideSubscribe(filter, qos, session, auth, limits, 256), expected, name);
    }
    // The cap counts the filters taken; one already held needs no room, an unsubscribed one frees its room.
    const capped = newSession(app.id, 'app', Infinity, 10);
    const [status, load] = [topics.allAgentStatus(), topics.allAgentLoad()];
    assert.deepEqual(decideSubscribe(status, 1, capped, true, limits, 1), { ok: true, qos: 1 });
    assert.equal(takeSubscription(capped, status, 1), true);
    const tooMany = { ok: false, reason: 'too-many-subscriptions', code: 'MESH_TOO_LARGE' };
    assert.deepEqual(decideSubscribe(load, 1, capped, true, limits, 1), tooMany);
    assert.equal(takeSubscription(capped, load, 1), false);
    assert.deepEqual(decideSubscribe(status, 0, capped, true, limits, 1), { ok: true, qos: 0 }, 'held already');
    releaseSubscriptions(capped, [status]);
    assert.deepEqual(decideSubscribe(load, 1, capped, true, limits, 1), { ok: true, qos: 1 });
    assert.deepEqual([0, 1, 2].map(grantedQos), [0, 1, 1]);
  });

  test('wills: policy, role, orphans', () => {
    const agent = generateIdentity('agent');
    const app = generateIdentity('app');
    assert.equal(checkWillPolicy({ topic: topics.agentStatus(agent.id), qos: 1 }, agent.id, limits), undefined);
    assert.equal(checkWillPolicy({ topic: topics.agentStatus(agent.id), qos: 2 }, agent.id, limits), 'will-qos2');
    assert.equal(checkWillPolicy({ topic: topics.agentStatus(app.id) }, agent.id, limits), 'will-not-own-status');
    assert.equal(checkWillPolicy({ topic: '$SYS/x' }, agent.id, limits), 'reserved-topic');
    assert.deepEqual((['agent', 'app', 'router', 'bridge', 'operator'] as const).map(willRoleRefusal), [
      undefined,
      'will-not-agent',
      'will-not-agent',
      'will-not-agent',
      'will-not-agent',
    ]);
    assert.equal(orphanWillAllowed(topics.agentStatus(agent.id), agent.id), true);
    assert.equal(orphanWillAllowed(topics.agentStatus(agent.id), app.id), false);
    assert.equal(orphanWillAllowed(topics.agentStatus(app.id), app.id), false, 'an app never had a will to orphan');
    assert.equal(orphanWillAllowed(topics.agentLoad(agent.id), agent.id), false);
    assert.equal(orphanWillAllowed(topics.agentStatus(agent.id), undefined), false);
  });
});

describe('admin records', () => {
  test('applyAdminRecord answers an ack for each record, coded when refused', async (t) => {
    const defer = cleanup(t);
    const op = generateIdentity('operator');
    const store = await AdmissionStore.open(await tempDir(defer, 'mesh-handlers-'), new Map([[op.id, op.publicKey]]), quiet);
    defer(() => store.close());
    const target = {
      admit: (s: Parameters<AdmissionStore['admit']>[0]) => store.admit(s),
      revoke: (s: Parameters<AdmissionStore['revoke']>[0]) => store.revoke(s),
    };
    const agent = generateIdentity('agent');
    const strangerOp = generateIdentity('operator');

    assert.deepEqual(await applyAdminRecord(encodeAdminRecord(admit(op, agent)), target), { v: 1, kind: 'ack', id: agent.id, ok: true });
    assert.ok(store.isAdmitted(agent.id, Date.now()));
    const refused = [
      [Buffer.from([0xff, 0x00]), 'MESH_BAD_REQUEST', ''],
      [Buffer.alloc(MAX_ADMIN_RECORD_BYTES + 1), 'MESH_TOO_LARGE', ''],
      [encodeAdminRecord(admit(strangerOp, generateIdentity('app'))), 'MESH_UNAUTHORIZED', undefined],
      [encodeMessage({ record: new Uint8Array([1]), sig: new Uint8Array(64) } as never), 'MESH_UNAUTHORIZED', ''],
    ] as const;
    for (const [payload, code, id] of refused) {
      const ack = await applyAdminRecord(payload, target);
      assert.equal(ack.ok, false, code);
      assert.equal(ack.code, code, ack.message);
      if (id !== undefined) assert.equal(ack.id, id);
    }
    assert.deepEqual(await applyAdminRecord(encodeAdminRecord(revoke(op, agent.id)), target), {
      v: 1,
      kind: 'ack',
      id: agent.id,
      ok: true,
    });
    assert.ok(!store.isAdmitted(agent.id, Date.now()));
  });
});
