/**
 * The agent's standby connection (`standbyConnection`, docs/operations.md "Running on a NATS cluster"), on the
 * embedded broker in open mode: the agent's first connection goes through a TCP relay the test can cut, the standby
 * straight to the broker. Cutting the relay drops the first connection abruptly, so the broker publishes its last
 * will (offline), as a dead node's peer or a lost path would. (test/nats.test.ts kills a node of a real cluster.)
 */
import assert from 'node:assert/strict';
import { type TestContext, test } from 'node:test';
import { sampleInputs } from '@edge-mesh/demo';
import { type AgentStatus, decodeMessage, topics } from '@edge-mesh/protocol';
import mqtt from 'mqtt';
import { agentFor, brokerFor, kwsOnlyDir, meshFor, tcpRelay, waitFor } from './helpers.ts';

/** Every status the agent publishes, in order, as a watcher sees them. */
async function watchStatus(t: TestContext, brokerUrl: string, agentId: string) {
  const seen: AgentStatus['state'][] = [];
  const watcher = await mqtt.connectAsync(brokerUrl, { clientId: `watcher-${Date.now()}` });
  t.after(() => watcher.endAsync());
  watcher.on('message', (_topic, payload) => {
    if (payload.length > 0) seen.push(decodeMessage(payload, ['status']).state);
  });
  await watcher.subscribeAsync(topics.agentStatus(agentId), { qos: 1 });
  return seen;
}

test('a standby connection serves at once when the first drops, and no will of the first connection is the last word', async (t) => {
  const broker = await brokerFor(t);
  // Three "nodes" of one broker: the first connection starts on A, the standby on the next, B.
  const [a, b, c] = [await tcpRelay(t, broker.port), await tcpRelay(t, broker.port), await tcpRelay(t, broker.port)];
  const agent = await agentFor(t, {
    brokerUrl: [a.url, b.url, c.url].join(','),
    modelsDir: await kwsOnlyDir(t),
    password: 'any (an open broker)',
    standbyConnection: true,
    retainStatus: false,
    keepaliveS: 2,
    backoff: { baseMs: 50, maxMs: 200 },
  });
  const seen = await watchStatus(t, broker.url, agent.id);
  const mesh = await meshFor(t, { brokerUrl: broker.url });
  await mesh.waitForModel('kws', 10_000);
  const infer = (seed: number) => mesh.infer('kws', sampleInputs('kws', seed), { deadlineMs: 3_000, agentId: agent.id });

  // Both connections receive every request; only the serving one handles it: each request runs once.
  for (let i = 0; i < 20; i++) assert.equal((await infer(i)).agentId, agent.id);
  assert.equal(agent.counters.received, 20);
  assert.equal(agent.counters.replays, 0);
  assert.equal(agent.counters.failovers, 0);

  // A dies, and B takes no newcomer (its standby stays): the broker publishes the first connection's will, the
  // standby serves at once and has the last word.
  b.refuse();
  a.refuse();
  a.drop();
  await waitFor(() => agent.counters.failovers === 1, 5_000, 'the failover');
  assert.equal((await infer(100)).agentId, agent.id);
  await waitFor(() => seen.includes('offline') && seen.at(-1) === 'online', 5_000, `online after the will (seen ${seen.join(',')})`);

  // The first connection comes back on C and stands by; then C dies too. The idle connection's will says offline
  // again, and again the serving standby speaks last, serving throughout.
  await waitFor(() => agent.counters.reconnects >= 1, 10_000, 'the first connection back on C');
  await new Promise((r) => setTimeout(r, 300));
  const offlines = seen.filter((s) => s === 'offline').length;
  c.refuse();
  c.drop();
  await waitFor(() => seen.filter((s) => s === 'offline').length > offlines, 10_000, "the idle connection's will");
  assert.equal((await infer(200)).agentId, agent.id);
  await waitFor(() => seen.at(-1) === 'online', 5_000, `online after the idle connection's will (seen ${seen.join(',')})`);
  assert.equal(agent.counters.failovers, 1, 'an idle connection that drops is not a switch');
  assert.equal(agent.counters.received, 22, 'every request ran once');
  assert.equal(agent.counters.replays, 0);
});

test('without a password or a second broker the agent runs without a standby, and says why', async (t) => {
  const broker = await brokerFor(t);
  const lines: string[] = [];
  const pino = (await import('pino')).default;
  const logger = pino({ level: 'warn' }, { write: (l: string) => void lines.push(l) });
  const agent = await agentFor(t, { brokerUrl: broker.url, modelsDir: await kwsOnlyDir(t), standbyConnection: true, logger });
  assert.ok(
    lines.some((l) => /no standby connection: it needs at least two broker URLs/.test(l)),
    lines.join('\n'),
  );
  const relayed = await tcpRelay(t, broker.port);
  // Two brokers but no password: CONNECT tokens bind a client id to its key.
  const second = await agentFor(t, {
    brokerUrl: `${relayed.url},${broker.url}`,
    modelsDir: await kwsOnlyDir(t),
    standbyConnection: true,
    logger,
  });
  assert.ok(
    lines.some((l) => /no standby connection: it needs a broker password/.test(l)),
    lines.join('\n'),
  );
  const mesh = await meshFor(t, { brokerUrl: broker.url });
  await mesh.waitForModel('kws', 10_000, 2);
  for (const id of [agent.id, second.id]) {
    assert.equal((await mesh.infer('kws', sampleInputs('kws', 1), { deadlineMs: 3_000, agentId: id })).agentId, id);
  }
});
