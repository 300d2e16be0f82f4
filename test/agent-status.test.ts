/**
 * `retainStatus: false` (the agent's `--no-retain-status`, for NATS): the agent's status is not retained on the broker,
 * and receivers still find the agent by asking it to announce (discover).
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { sampleInputs } from '@edge-mesh/demo';
import { topics } from '@edge-mesh/protocol';
import mqtt from 'mqtt';
import { agentFor, brokerFor, kwsOnlyDir, meshFor } from './helpers.ts';

async function retainedStatus(brokerUrl: string, agentId: string): Promise<Buffer | undefined> {
  const probe = await mqtt.connectAsync(brokerUrl, { clientId: `probe-${Date.now()}` });
  try {
    let retained: Buffer | undefined;
    probe.on('message', (_topic, payload, packet) => {
      if (packet.retain) retained = payload;
    });
    await probe.subscribeAsync(topics.agentStatus(agentId), { qos: 1 });
    await new Promise((r) => setTimeout(r, 300));
    return retained;
  } finally {
    await probe.endAsync();
  }
}

test('an agent that does not retain its status leaves none on the broker, and a newcomer still finds it', async (t) => {
  const broker = await brokerFor(t);
  const modelsDir = await kwsOnlyDir(t);
  const quiet = await agentFor(t, { brokerUrl: broker.url, modelsDir, retainStatus: false });
  const retaining = await agentFor(t, { brokerUrl: broker.url, modelsDir });
  assert.equal(await retainedStatus(broker.url, quiet.id), undefined, 'no retained status');
  assert.ok(await retainedStatus(broker.url, retaining.id), 'the default agent retains its status');
  // A client that joins later asks every agent to announce, and gets the answer live.
  const mesh = await meshFor(t, { brokerUrl: broker.url });
  await mesh.waitForModel('kws', 10_000, 2);
  const r = await mesh.infer('kws', sampleInputs('kws', 1), { deadlineMs: 5_000, agentId: quiet.id });
  assert.equal(r.agentId, quiet.id);
});
