import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { readAgentStatus, readReply } from '@edge-mesh/client';
import {
  type AgentStatus,
  admit,
  connectTokenMessage,
  decodeMessage,
  deriveId,
  encodeKeyFile,
  encodeMessage,
  generateIdentity,
  identityFromSeed,
  idMatchesKey,
  isValidId,
  MeshError,
  makeConnectToken,
  newRequestId,
  PROTOCOL_VERSION,
  parseKeyFile,
  readConnectToken,
  requestIdHex,
  revoke,
  roleOfId,
  signBytes,
  signStatus,
  verifyBytes,
  verifyRecord,
  verifyStatus,
} from '@edge-mesh/protocol';
import * as noble from '@noble/ed25519';

const unauthorized = (err: unknown) => err instanceof MeshError && err.code === 'MESH_UNAUTHORIZED';

describe('identity', () => {
  test('ids derive from the public key, carry the role and fit the topic id rules', () => {
    const a = generateIdentity('agent');
    assert.match(a.id, /^agent-[a-z2-7]{26}$/);
    assert.ok(isValidId(a.id));
    assert.equal(roleOfId(a.id), 'agent');
    assert.ok(idMatchesKey(a.id, a.publicKey));
    assert.ok(!idMatchesKey(a.id, generateIdentity('agent').publicKey));
    assert.equal(deriveId('app', a.publicKey).slice(4), a.id.slice(6));
    assert.equal(roleOfId('agent-1'), undefined);
  });

  test('node:crypto and @noble/ed25519 produce and accept the same signatures', async () => {
    for (let i = 0; i < 20; i++) {
      const me = generateIdentity('app');
      const message = new Uint8Array(Buffer.from(`message ${i} ${'x'.repeat(i * 7)}`));
      const ours = signBytes(me, message);
      assert.deepEqual(await noble.getPublicKeyAsync(me.seed), me.publicKey);
      assert.deepEqual(await noble.signAsync(message, me.seed), ours);
      assert.ok(await noble.verifyAsync(ours, message, me.publicKey));
      assert.ok(verifyBytes(me.publicKey, message, await noble.signAsync(message, me.seed)));
      const tampered = new Uint8Array(ours);
      tampered[i % 64]! ^= 1;
      assert.ok(!verifyBytes(me.publicKey, message, tampered));
    }
  });

  test('key files round trip and reject tampering', () => {
    const me = generateIdentity('router');
    const text = encodeKeyFile(me);
    const back = parseKeyFile(text);
    assert.equal(back.id, me.id);
    assert.deepEqual(back.publicKey, me.publicKey);
    const other = JSON.parse(text);
    other.id = generateIdentity('router').id;
    assert.throws(
      () => parseKeyFile(JSON.stringify(other)),
      (e: unknown) => e instanceof MeshError && e.code === 'MESH_CONFIG',
    );
    assert.throws(
      () => parseKeyFile('{"v":1}'),
      (e: unknown) => e instanceof MeshError && e.code === 'MESH_CONFIG',
    );
    assert.deepEqual(identityFromSeed('router', me.seed).publicKey, me.publicKey);
  });

  test('connect tokens bind client id, time and nonce', () => {
    const me = generateIdentity('agent');
    const token = makeConnectToken(me, 1_700_000_000_000);
    assert.equal(token.byteLength, 88);
    const t = readConnectToken(token)!;
    assert.equal(t.timestampMs, 1_700_000_000_000);
    assert.ok(verifyBytes(me.publicKey, connectTokenMessage(me.id, t.timestampMs, t.nonce), t.signature));
    assert.ok(!verifyBytes(me.publicKey, connectTokenMessage(generateIdentity('agent').id, t.timestampMs, t.nonce), t.signature));
    assert.ok(!verifyBytes(me.publicKey, connectTokenMessage(me.id, t.timestampMs + 1, t.nonce), t.signature));
    assert.equal(readConnectToken(token.subarray(1)), undefined);
    assert.equal(readConnectToken(undefined), undefined);
  });

  test('admissions and revocations verify only against trusted operators', () => {
    const operator = generateIdentity('operator');
    const agent = generateIdentity('agent');
    const trusted = new Map([[operator.id, operator.publicKey]]);
    const signed = admit(operator, agent, { nowMs: 1000, ttlMs: 5000 });
    const record = verifyRecord(signed, trusted, 2000);
    assert.equal(record.kind, 'admission');
    assert.equal(record.id, agent.id);
    assert.throws(() => verifyRecord(signed, trusted, 7000), unauthorized);
    assert.throws(() => verifyRecord(signed, new Map(), 2000), unauthorized);
    const rogue = generateIdentity('operator');
    assert.throws(() => verifyRecord(admit(rogue, agent, { nowMs: 1000 }), trusted, 2000), unauthorized);
    const forged = { ...signed, record: new Uint8Array(signed.record) };
    forged.record[forged.record.length - 1]! ^= 1;
    assert.throws(() => verifyRecord(forged, trusted, 2000), unauthorized);
    assert.throws(
      () => admit(agent, generateIdentity('app')),
      (e: unknown) => e instanceof MeshError && e.code === 'MESH_CONFIG',
    );
    const revocation = verifyRecord(revoke(operator, agent.id, 3000), trusted, 4000);
    assert.equal(revocation.kind, 'revocation');
    assert.throws(() => verifyRecord({ record: 'x', sig: 1 }, trusted), unauthorized);
  });

  test('agent status signatures', () => {
    const agent = generateIdentity('agent');
    const status: AgentStatus = {
      v: PROTOCOL_VERSION,
      kind: 'status',
      agent: agent.id,
      state: 'online',
      ts: 1_800_000_000_123,
      workers: 2,
    };
    const signed = signStatus(agent, status);
    assert.ok(verifyStatus(signed));
    // As a receiver sees it: after CBOR encoding, the wire and schema validation.
    assert.ok(verifyStatus(decodeMessage(encodeMessage(signed), ['status'])));
    assert.ok(!verifyStatus(status));
    assert.ok(!verifyStatus({ ...signed, workers: 3 }));
    const impostor = generateIdentity('agent');
    assert.ok(!verifyStatus(signStatus(impostor, status)), 'signed by a key the id does not derive from');
  });
});

describe('reading what agents publish', () => {
  test('statuses: malformed, foreign, unsigned and mis-signed ones are told apart', () => {
    const agent = generateIdentity('agent');
    const status: AgentStatus = { v: PROTOCOL_VERSION, kind: 'status', agent: agent.id, state: 'offline', ts: 1 };
    const ok = readAgentStatus(agent.id, encodeMessage(signStatus(agent, status)));
    assert.ok(ok.ok && ok.status.state === 'offline');
    assert.equal((readAgentStatus(agent.id, Buffer.from([0xff])) as { reason: string }).reason, 'malformed');
    assert.equal(
      (readAgentStatus(generateIdentity('agent').id, encodeMessage(signStatus(agent, status))) as { reason: string }).reason,
      'foreign',
    );
    assert.equal((readAgentStatus(agent.id, encodeMessage(status)) as { reason: string }).reason, 'unverified');
    assert.equal(
      (readAgentStatus(agent.id, encodeMessage({ ...signStatus(agent, status), ts: 2 })) as { reason: string }).reason,
      'unverified',
    );
    assert.ok(readAgentStatus(agent.id, encodeMessage(status), { requireSigned: false }).ok);
  });

  test('replies: results, coded errors, and replies naming another agent', () => {
    const id = newRequestId();
    const res = readReply(
      'agent-a',
      encodeMessage({ v: PROTOCOL_VERSION, kind: 'res', id, agent: 'agent-a', model: 'kws', outputs: {}, queueMs: 0, execMs: 1 }),
    )!;
    assert.equal(res.key, requestIdHex(id));
    assert.ok(res.reply && !res.error);
    const err = readReply(
      'agent-a',
      encodeMessage({ v: PROTOCOL_VERSION, kind: 'err', id, agent: 'agent-a', code: 'MESH_BUSY', message: 'full' }),
    )!;
    assert.ok(err.error instanceof MeshError && err.error.code === 'MESH_BUSY' && !err.reply);
    const odd = readReply(
      'agent-a',
      encodeMessage({ v: PROTOCOL_VERSION, kind: 'err', id, agent: 'agent-a', code: 'MESH_MADE_UP', message: '?' }),
    )!;
    assert.equal(odd.error!.code, 'MESH_INTERNAL');
    assert.equal(
      readReply('agent-b', encodeMessage({ v: PROTOCOL_VERSION, kind: 'err', id, agent: 'agent-a', code: 'MESH_BUSY', message: 'x' })),
      undefined,
    );
    assert.equal(readReply('agent-a', Buffer.from([0x00])), undefined);
  });
});
