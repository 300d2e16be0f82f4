/**
 * The mesh with identities: signed status (the SDK ignores forgeries), the agent's request-id replay
 * guard, and agents and apps serving through an authenticated broker, admitted and revoked over MQTT by
 * the CLI. Forged statuses are published on an OPEN broker so that ACLs do not hide them from the SDK.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { describe, type TestContext, test } from 'node:test';
import { promisify } from 'node:util';
import { startAgent } from '@edge-mesh/agent';
import { openMeshConnection, sendAdminRecord } from '@edge-mesh/client';
import { sampleInputs } from '@edge-mesh/demo';
import {
  type AgentStatus,
  admit,
  decodeMessage,
  type ErrorReply,
  encodeMessage,
  generateIdentity,
  type InferRequest,
  MeshError,
  newRequestId,
  PROTOCOL_VERSION,
  requestIdHex,
  signStatus,
  topics,
  verifyStatus,
} from '@edge-mesh/protocol';
import { connect } from '@edge-mesh/sdk';
import { agentFor, brokerFor, keyFileFor, meshFor, modelsDir, quiet, ROOT, rawClient, tempDir, waitFor } from './helpers.ts';

const run = promisify(execFile);
const BIN = path.join(ROOT, 'cli/bin/edge-mesh.mjs');
const edgeMesh = (args: string[]) => run(process.execPath, [BIN, ...args], { timeout: 60_000 });
const kws = () => sampleInputs('kws', 3);
const unauthorized = (err: unknown) => err instanceof MeshError && err.code === 'MESH_UNAUTHORIZED';

/** An authenticated broker on port 0 trusting one fresh operator, with its admission store in a temp folder. */
async function authBroker(t: TestContext) {
  const operator = generateIdentity('operator');
  const dataDir = await tempDir(t, 'edge-mesh-broker-');
  const broker = await brokerFor(t, { auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], dataDir } });
  return { broker, operator };
}

function kwsRequest(inputName: string, deadlineInMs = 5_000): InferRequest {
  return {
    v: PROTOCOL_VERSION,
    kind: 'req',
    id: newRequestId(),
    deadline: Date.now() + deadlineInMs,
    model: 'kws',
    inputs: { [inputName]: { dtype: 'float32', shape: [1, 25, 96], data: new Uint8Array(2400 * 4) } },
  };
}

describe('signed status', () => {
  test('the SDK ignores unsigned, foreign-signed and mis-signed statuses, forged offline ones too, and uses the genuine agent', async (t) => {
    const broker = await brokerFor(t);
    const genuine = await agentFor(t, { brokerUrl: broker.url });
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('kws');
    const models = genuine.status().models!.map((m) => ({ ...m, latencyMs: 0.0001 }));
    // Each forgery advertises an implausibly fast agent, so the SDK would pick it if it believed it.
    const forged = (agent: string, state: AgentStatus['state'] = 'online'): AgentStatus => ({
      v: PROTOCOL_VERSION,
      kind: 'status',
      agent,
      state,
      ts: Date.now(),
      session: 'forged',
      models,
      workers: 64,
    });
    const unsignedId = generateIdentity('agent').id;
    const victim = generateIdentity('agent');
    const impostor = generateIdentity('agent');
    const misSigned = generateIdentity('agent');
    const tampered = signStatus(misSigned, forged(misSigned.id));
    tampered.sig![0]! ^= 1;
    const forgeries: AgentStatus[] = [
      forged(unsignedId),
      // Signed by a key the id does not derive from: the impostor's key, in the victim's name.
      { ...signStatus(impostor, forged(impostor.id)), agent: victim.id },
      signStatus(impostor, forged(victim.id)),
      tampered,
      // An edited status keeps the genuine agent's key and signature but lies about its models.
      { ...genuine.status(), models },
      // Forged offline statuses for the genuine agent: unsigned, and signed by someone else.
      forged(genuine.id, 'offline'),
      { ...signStatus(impostor, forged(impostor.id, 'offline')), agent: genuine.id },
    ];
    const forger = await rawClient(t, broker.url, 'forger-1');
    for (const status of forgeries) forger.client.publish(topics.agentStatus(status.agent), encodeMessage(status), { qos: 1 });
    // Load reports of agents without a verified status change nothing either.
    forger.client.publish(
      topics.agentLoad(unsignedId),
      encodeMessage({
        v: PROTOCOL_VERSION,
        kind: 'load',
        agent: unsignedId,
        ts: Date.now(),
        seq: 1,
        queued: 0,
        inFlight: 0,
        workers: 64,
        models: {},
      }),
      { qos: 0 },
    );
    await waitFor(() => mesh.counters.statusRejected >= forgeries.length, 5_000, 'every forged status to be rejected');
    assert.equal(mesh.counters.statusRejected, forgeries.length);
    await waitFor(() => mesh.counters.loadIgnored >= 1, 5_000, 'the forged load report to be ignored');
    assert.deepEqual(
      mesh.agents().map((a) => a.id),
      [genuine.id],
    );
    assert.equal(mesh.agents()[0]!.status.session, genuine.status().session);
    for (let i = 0; i < 5; i++) assert.equal((await mesh.infer('kws', kws())).agentId, genuine.id);

    // The same forgeries reach a client that opted out of the check (requireSignedStatus: false).
    const lax = await meshFor(t, { brokerUrl: broker.url, requireSignedStatus: false });
    await lax.waitForModel('kws');
    forger.client.publish(topics.agentStatus(unsignedId), encodeMessage(forged(unsignedId)), { qos: 1 });
    await waitFor(() => lax.agents().some((a) => a.id === unsignedId), 5_000, 'the lax client to take the unsigned status');
    assert.equal(lax.counters.statusRejected, 0);
  });

  // The will (a signed offline status built at start) is what the SDK sees when an agent is killed: the
  // SIGKILL test in mesh.test.ts relies on it, since the SDK believes only signed offline statuses.
  test("the agent's retained and offline statuses are signed by its key", async (t) => {
    const broker = await brokerFor(t);
    const identity = generateIdentity('agent');
    const agent = await agentFor(t, { brokerUrl: broker.url, identity });
    assert.equal(agent.id, identity.id);
    const seen: AgentStatus[] = [];
    const watcher = openMeshConnection(broker.url, {
      clientId: 'watcher-1',
      onConnect: (c) => c.subscribe(topics.agentStatus(agent.id), { qos: 1 }),
    });
    t.after(() => watcher.close());
    watcher.client.on('message', (_topic, payload) => seen.push(decodeMessage(payload, ['status'])));
    const mesh = await meshFor(t, { brokerUrl: broker.url });
    await mesh.waitForModel('kws');
    await waitFor(() => seen.length >= 1, 5_000, 'retained status');
    assert.equal(seen[0]!.state, 'online');
    assert.ok(Buffer.from(seen[0]!.publicKey!).equals(Buffer.from(identity.publicKey)));
    assert.ok(verifyStatus(seen[0]!));
    await agent.close();
    await waitFor(() => seen.some((s) => s.state === 'offline'), 5_000, 'offline status');
    assert.ok(verifyStatus(seen.find((s) => s.state === 'offline')!));
    await waitFor(() => mesh.agents().length === 0, 5_000, 'the SDK to drop the agent');
  });
});

describe('request replay guard', () => {
  test('a request id sent again is never run twice: its sender gets the same reply again, anyone else a refusal', async (t) => {
    const broker = await brokerFor(t);
    const agent = await agentFor(t, { brokerUrl: broker.url });
    const raw = await rawClient(t, broker.url, 'replayer-1');
    const other = await rawClient(t, broker.url, 'replayer-2');
    const input = agent.models.find((m) => m.name === 'kws')!.inputs[0]!.name;
    const request = kwsRequest(input);
    const key = requestIdHex(request.id);
    const replies: Buffer[] = [];
    raw.client.on('message', (_topic, payload) => {
      if (requestIdHex(decodeMessage(payload, ['res', 'err']).id) === key) replies.push(Buffer.from(payload));
    });
    const refusals: ErrorReply[] = [];
    other.client.on('message', (_topic, payload) => {
      const reply = decodeMessage(payload, ['res', 'err']);
      if (requestIdHex(reply.id) === key && reply.kind === 'err') refusals.push(reply);
    });
    const bytes = encodeMessage(request);
    // Back to back, while the first is still queued or running: one reply, when it is done.
    raw.client.publish(topics.agentRequest(agent.id, raw.clientId), bytes, { qos: 1 });
    raw.client.publish(topics.agentRequest(agent.id, raw.clientId), bytes, { qos: 1 });
    await waitFor(() => replies.length >= 1, 5_000, 'the reply');
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(replies.length, 1, 'the copy sent while it ran is not answered on its own');
    assert.equal(decodeMessage(replies[0]!, ['res', 'err']).kind, 'res');
    // Once more after it finished (as a sender whose connection dropped before the reply arrived): the same reply.
    raw.client.publish(topics.agentRequest(agent.id, raw.clientId), bytes, { qos: 1 });
    await waitFor(() => replies.length >= 2, 5_000, 'the reply again');
    assert.ok(replies[1]!.equals(replies[0]!), 'byte for byte the reply it had');
    // Another sender with the same id: refused, and none of the first sender's outputs.
    other.client.publish(topics.agentRequest(agent.id, other.clientId), bytes, { qos: 1 });
    await waitFor(() => refusals.length >= 1, 5_000, 'the refusal');
    assert.equal(refusals[0]!.code, 'MESH_BAD_REQUEST');
    assert.match(refusals[0]!.message, /replayed request id/);
    assert.equal(agent.counters.served, 1);
    assert.equal(agent.counters.replays, 3);
    assert.equal(agent.loadReport().models.kws!.served, 1);
    // A fresh id is served as usual.
    const fresh = kwsRequest(input);
    assert.equal((await raw.request(agent.id, fresh.id, fresh)).kind, 'res');
  });
});

describe('authenticated broker', () => {
  test('an admitted agent serves an admitted app end to end; unadmitted and anonymous clients are refused', async (t) => {
    const { broker, operator } = await authBroker(t);
    const agentKey = generateIdentity('agent');
    const appKey = generateIdentity('app');
    await broker.admit(admit(operator, agentKey));
    await broker.admit(admit(operator, appKey));
    const agent = await agentFor(t, { brokerUrl: broker.url, identity: agentKey });
    const mesh = await meshFor(t, { brokerUrl: broker.url, identity: appKey });
    await mesh.waitForModel('kws');
    for (let i = 0; i < 5; i++) assert.equal((await mesh.infer('kws', kws())).agentId, agent.id);
    assert.equal(mesh.counters.statusRejected, 0);

    await assert.rejects(connect({ brokerUrl: broker.url, identity: generateIdentity('app'), logger: quiet }), unauthorized);
    await assert.rejects(
      connect({ brokerUrl: broker.url, logger: quiet }),
      (err: unknown) => unauthorized(err) && /ephemeral key/.test((err as Error).message),
    );
    await assert.rejects(
      startAgent({ brokerUrl: broker.url, modelsDir: await modelsDir(), workers: 1, logger: quiet, identity: generateIdentity('agent') }),
      unauthorized,
    );
  });

  test('every reconnect proves the key with a fresh token', async (t) => {
    const { broker, operator } = await authBroker(t);
    const appKey = generateIdentity('app');
    await broker.admit(admit(operator, appKey));
    let connects = 0;
    const refusals: string[] = [];
    const connection = openMeshConnection(broker.url, {
      identity: appKey,
      backoff: { baseMs: 20, maxMs: 100 },
      onConnect: () => connects++,
      onRefused: (err) => refusals.push(err.message),
    });
    t.after(() => connection.close());
    await connection.firstConnect;
    for (let i = 1; i <= 3; i++) {
      (connection.client.stream as { destroy(): void }).destroy();
      await waitFor(() => connects === i + 1, 5_000, `reconnect ${i}`);
    }
    assert.deepEqual(refusals, []);
  });

  test("admissions sent at once with one operator key all land, though each session takes the others' client id over", {
    timeout: 60_000,
  }, async (t) => {
    const { broker, operator } = await authBroker(t);
    // Eight admin sessions under the operator's id: each connect makes the broker close the one before it, whose
    // subscription then fails with "Connection closed". That is not a refusal: the session connects again and resends.
    const subjects = Array.from({ length: 8 }, (_, i) => generateIdentity(i % 2 === 0 ? 'agent' : 'app'));
    const started = performance.now();
    const acks = await Promise.all(subjects.map((s) => sendAdminRecord(broker.url, operator, admit(operator, s), s.id, 20_000)));
    t.diagnostic(`8 admissions at once in ${(performance.now() - started).toFixed(0)} ms`);
    assert.deepEqual(
      acks.map((a) => [a.id, a.ok]),
      subjects.map((s) => [s.id, true]),
    );
    // Stored: every subject now connects.
    for (const s of subjects) {
      const c = openMeshConnection(broker.url, { identity: s });
      t.after(() => c.close());
      await c.firstConnect;
    }
  });

  test('edge-mesh admit and revoke: an admitted agent serves, a revoked one is cut off and stays out', async (t) => {
    const { broker, operator } = await authBroker(t);
    const operatorFile = await keyFileFor(t, operator);
    const agentKey = generateIdentity('agent');
    const appKey = generateIdentity('app');

    const admitted = JSON.parse(
      (await edgeMesh(['admit', '--key', operatorFile, '--subject-key', await keyFileFor(t, agentKey), '--broker', broker.url])).stdout,
    );
    assert.equal(admitted.admitted, agentKey.id);
    assert.equal(admitted.role, 'agent');
    const publicKey = Buffer.from(appKey.publicKey).toString('base64url');
    const app = JSON.parse(
      (
        await edgeMesh([
          'admit',
          '--key',
          operatorFile,
          '--public-key',
          publicKey,
          '--role',
          'app',
          '--ttl-days',
          '1',
          '--broker',
          broker.url,
        ])
      ).stdout,
    );
    assert.equal(app.admitted, appKey.id);

    const agent = await agentFor(t, { brokerUrl: broker.url, identity: agentKey, backoff: { baseMs: 50, maxMs: 200 } });
    const mesh = await meshFor(t, { brokerUrl: broker.url, identity: appKey });
    await mesh.waitForModel('kws');
    assert.equal((await mesh.infer('kws', kws())).agentId, agent.id);

    const revokedAt = performance.now();
    const revoked = JSON.parse((await edgeMesh(['revoke', '--key', operatorFile, '--id', agent.id, '--broker', broker.url])).stdout);
    assert.equal(revoked.revoked, agent.id);
    // Cut off: its signed will marks it offline and the SDK drops it.
    await waitFor(() => !mesh.agents().some((a) => a.id === agent.id), 5_000, 'the revoked agent to leave the mesh');
    const cutOffMs = performance.now() - revokedAt;
    await assert.rejects(mesh.infer('kws', kws(), { deadlineMs: 300 }), (err: unknown) => err instanceof MeshError);
    // It keeps trying to reconnect (fast backoff here) and is refused every time.
    const announcements = agent.counters.announcements;
    await new Promise((r) => setTimeout(r, 600));
    assert.equal(agent.counters.announcements, announcements);
    assert.ok(!mesh.agents().some((a) => a.id === agent.id));
    t.diagnostic(`revoked agent left the mesh ${cutOffMs.toFixed(0)} ms after the CLI started`);

    // A key that is not an operator's cannot admit anyone.
    await assert.rejects(
      edgeMesh([
        'admit',
        '--key',
        await keyFileFor(t, appKey),
        '--subject-key',
        await keyFileFor(t, generateIdentity('agent')),
        '--broker',
        broker.url,
      ]),
      (err: { stderr?: string }) => /operator/.test(err.stderr ?? ''),
    );
  });
});
