/**
 * The deployment topic mesh/v1/deploy/{group}/{model} on an authenticated broker (broker/src/acl.ts, docs/deployment.md):
 * operators and routers publish steps there, retained; agents, apps and bridges cannot, so none of them can squat the
 * retained slot an agent reads when it connects (what a dishonest agent would gain: a retained step that hides the
 * operator's, or a replay of an old one on every reconnect). Every role may subscribe: a step is signed, not secret, and
 * an agent applies only its own groups' (edge-agent/src/deploy.ts). Real broker on port 0, real mqtt.js clients.
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { deploymentTopics, type Identity, type Role } from '@edge-mesh/protocol';
import {
  admitted,
  authBrokerFor,
  cleanup,
  connect,
  type Defer,
  grantedQoS,
  messagesDuring,
  nextMessage,
  waitClose,
} from './broker-fixtures.ts';

const authBroker = authBrokerFor('broker-deploy-acl-', {
  connectBurstPerIp: 10_000,
  connectRatePerIp: 10_000,
  authFailuresBeforeBan: 10_000,
  addressFailuresBeforeLimit: 10_000,
});
const STEP = deploymentTopics.step('edge-pis', 'scale');

/** Publishes once per fresh connection (a refused publish costs the connection): 'allowed' when acknowledged. */
async function verdict(defer: Defer, b: Parameters<typeof connect>[1], who: Identity, topic: string, payload: string, retain = true) {
  const c = await connect(defer, b, who);
  let closed = false;
  c.on('close', () => (closed = true));
  c.publish(topic, payload, { qos: 1, retain });
  await Promise.race([
    new Promise<void>((resolve) => c.once('packetreceive', (p) => p.cmd === 'puback' && resolve())),
    waitClose(c).then(() => undefined),
  ]);
  await new Promise((r) => setTimeout(r, 20));
  const result = closed ? 'refused' : 'allowed';
  await c.endAsync(true);
  return result;
}

test('ACL: only operators and routers publish deployment steps; agents, apps and bridges are cut off and retain nothing', {
  timeout: 30_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const who = {} as Record<Role, Identity>;
  for (const role of ['operator', 'router', 'agent', 'app', 'bridge'] as const) who[role] = await admitted(ab, role);
  // The broker's trusted operator connects with its own key, no admission needed.
  who.operator = ab.op;

  // A watcher (an agent of the group) sees what gets through, live.
  const watcher = await connect(defer, ab.b, await admitted(ab, 'agent'));
  await watcher.subscribeAsync(deploymentTopics.group('edge-pis'), { qos: 1 });
  const seen: string[] = [];
  watcher.on('message', (_topic, payload) => seen.push(payload.toString()));

  const verdicts: Record<string, string> = {};
  for (const role of ['agent', 'app', 'bridge', 'router', 'operator'] as const) {
    verdicts[role] = await verdict(defer, ab.b, who[role], STEP, `from-${role}`);
    verdicts[`${role} not retained`] = await verdict(
      defer,
      ab.b,
      who[role],
      deploymentTopics.step('edge-pis', 'other'),
      `live-${role}`,
      false,
    );
  }
  assert.deepEqual(verdicts, {
    agent: 'refused',
    'agent not retained': 'refused',
    app: 'refused',
    'app not retained': 'refused',
    bridge: 'refused',
    'bridge not retained': 'refused',
    router: 'allowed',
    'router not retained': 'allowed',
    operator: 'allowed',
    'operator not retained': 'allowed',
  });
  // Malformed deployment topics are refused even for an operator.
  for (const topic of [
    'mesh/v1/deploy/edge-pis',
    'mesh/v1/deploy/EDGE/scale',
    `${STEP}/extra`,
    'mesh/v1/deploy/edge-pis/+',
    'mesh/v1/deploy/ab/scale',
  ])
    assert.equal(await verdict(defer, ab.b, who.operator, topic, 'x'), 'refused', topic);

  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(seen.sort(), ['from-operator', 'from-router', 'live-operator', 'live-router']);

  // An agent that connects later gets the operator's retained step, the last one that was allowed; nothing of the others.
  const late = await connect(defer, ab.b, await admitted(ab, 'agent'));
  const first = nextMessage(late);
  await late.subscribeAsync(deploymentTopics.group('edge-pis'), { qos: 1 });
  const retained = await first;
  assert.deepEqual([retained.topic, retained.payload.toString(), retained.retain], [STEP, 'from-operator', true]);
  assert.deepEqual(await messagesDuring(late, 300), [], 'one retained step, no retained live-only messages');

  // An agent trying to overwrite that slot (an empty retained payload would clear it) is cut off; the step stays.
  assert.equal(await verdict(defer, ab.b, who.agent, STEP, ''), 'refused');
  const again = await connect(defer, ab.b, await admitted(ab, 'app'));
  const next = nextMessage(again);
  await again.subscribeAsync(STEP, { qos: 1 });
  assert.equal((await next).payload.toString(), 'from-operator');
});

test('ACL: every role may subscribe to deployment topics (the agent checks the group and signature), never to more', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  for (const role of ['agent', 'app', 'bridge', 'router', 'operator'] as const) {
    const c = await connect(defer, ab.b, role === 'operator' ? ab.op : await admitted(ab, role));
    assert.deepEqual(
      await grantedQoS(c, [deploymentTopics.group('edge-pis'), STEP, deploymentTopics.all()]),
      { [deploymentTopics.group('edge-pis')]: 1, [STEP]: 1, [deploymentTopics.all()]: 1 },
      role,
    );
    assert.deepEqual(
      await grantedQoS(c, ['mesh/v1/deploy/#', `${STEP}/extra`, 'mesh/v1/deploy/EDGE/+', 'mesh/v1/#']),
      { 'mesh/v1/deploy/#': 128, [`${STEP}/extra`]: 128, 'mesh/v1/deploy/EDGE/+': 128, 'mesh/v1/#': 128 },
      role,
    );
  }
});

test('an empty retained deployment step is refused, even from a router or an operator: the retained step stays', {
  timeout: 20_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  assert.equal(await verdict(defer, ab.b, ab.op, STEP, 'from-operator'), 'allowed');
  // An empty retained message deletes the retained one (MQTT 3.1.1 §3.3.1.3): one router could once erase every
  // group's step, each topic with one publish.
  const router = await admitted(ab, 'router');
  assert.equal(await verdict(defer, ab.b, router, STEP, ''), 'refused');
  assert.equal(await verdict(defer, ab.b, ab.op, STEP, ''), 'refused');
  assert.ok(ab.logs.some((l) => l.reason === 'empty-retained-step' && l.code === 'MESH_FORBIDDEN' && l.clientId === router.id));
  // Not retained, an empty message clears nothing and goes through (the receivers refuse it: it is not signed).
  assert.equal(await verdict(defer, ab.b, router, STEP, '', false), 'allowed');

  const late = await connect(defer, ab.b, await admitted(ab, 'agent'));
  const first = nextMessage(late);
  await late.subscribeAsync(STEP, { qos: 1 });
  const retained = await first;
  assert.deepEqual([retained.payload.toString(), retained.retain], ['from-operator', true]);
});
