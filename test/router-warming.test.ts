/** Warming cold agents ahead of demand (router/src/warming.ts) and the policy's warming copy, on virtual time. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type Attempt, createRequestEngine } from '@edge-mesh/client';
import {
  type AgentDescriptor,
  createRegistry,
  createRouterPolicy,
  createWarmer,
  onModelState,
  onQueueReport,
  type Registry,
  type RouterAsk,
  upsertAgent,
} from '@edge-mesh/router';
import { VirtualClock } from './virtual-clock.ts';

const agent = (agentId: string, serviceMs: number, warm: boolean, slots = 1): AgentDescriptor => ({
  agentId,
  hardwareClass: 'gpu',
  site: 'here',
  slots,
  models: [{ model: 'det', serviceMs, warm, coldLoadMs: 3_000 }],
});

/** Three warm agents, and two cold ones: a fast one (2 slots, 8 ms) and a slow one. */
function fleet(): Registry {
  // No heartbeats in these tests: agents stay alive.
  const reg = createRegistry({ site: 'here', sameSiteRttMs: 2, exploreRate: 0, seed: 1, heartbeatTimeoutMs: 1e9 });
  for (const a of [agent('warm-a', 30, true), agent('warm-b', 30, true), agent('warm-c', 30, true)]) upsertAgent(reg, a, 0);
  upsertAgent(reg, agent('cold-fast', 8, false, 2), 0);
  upsertAgent(reg, agent('cold-slow', 300, false), 0);
  return reg;
}

test('the warmer asks for one load when most warm agents have no free slot, cold agents drawn by capacity, each once per load time', () => {
  const reg = fleet();
  const warmer = createWarmer(reg, { checkEveryMs: 1_000, retryMs: 5_000 }, () => 0.5);
  assert.equal(warmer.target('det', 0), undefined, 'idle warm agents: no load');
  onQueueReport(reg, 'warm-a', 1, 1_000);
  assert.equal(warmer.target('det', 1_000), undefined, 'one busy agent of three: no load');
  onQueueReport(reg, 'warm-b', 2, 1_500);
  assert.equal(warmer.target('det', 1_500), undefined, 'at most one look per model and second');
  assert.equal(warmer.target('det', 2_000)?.agent.agentId, 'cold-fast');
  // Asked already: the next one is the slow cold agent, and the fast one again only after load time + retry.
  assert.equal(warmer.target('det', 3_000)?.agent.agentId, 'cold-slow');
  assert.equal(warmer.target('det', 4_000), undefined);
  assert.equal(warmer.target('det', 10_000)?.agent.agentId, 'cold-fast');
  // An agent that reports the model loading counts as warm capacity, not as a target.
  onModelState(reg, 'cold-slow', 'det', { warm: false, loadEtaMs: 2_000 }, 10_500);
  assert.equal(warmer.target('det', 11_000), undefined);
  assert.equal(warmer.target('unknown-model', 11_000), undefined);
});

function send(warming: boolean) {
  const reg = fleet();
  for (const id of ['warm-a', 'warm-b', 'warm-c']) onQueueReport(reg, id, 1, 0);
  const clock = new VirtualClock();
  const sent: Attempt<RouterAsk>[] = [];
  const cancelled: string[] = [];
  const engine = createRequestEngine<RouterAsk, { queueMs: number; execMs: number }>({
    policy: createRouterPolicy(reg, { hedging: false, warming, random: () => 0.5 }),
    clock,
    transport: { send: (a) => sent.push(a), cancel: (a) => cancelled.push(a.agentId) },
  });
  engine.start({ key: 'r1', deadlineAt: 3_000, data: { model: 'det', bytesUp: 1_000 }, model: 'det' }, () => {});
  clock.runDue();
  return { engine, sent, cancelled };
}

test('a warming copy goes at once to the cold agent, without a per-try timeout, and is cancelled when the request is answered', () => {
  const { engine, sent, cancelled } = send(true);
  assert.equal(sent.length, 2);
  assert.ok(sent[0]!.agentId.startsWith('warm-'));
  assert.equal(sent[1]!.agentId, 'cold-fast');
  assert.equal(sent[1]!.kind, 'hedge');
  assert.equal(sent[1]!.plan.timeoutMs, undefined);
  engine.answer('r1', sent[0]!.agentId, { queueMs: 0, execMs: 30 });
  assert.deepEqual(cancelled, ['cold-fast']);
  // Without warming, the same request goes to one warm agent only (hedging is off here).
  assert.deepEqual(
    send(false).sent.map((a) => a.agentId.startsWith('warm-')),
    [true],
  );
});
