/**
 * The router's network learner (router/src/netfit.ts): RTT and transfer rate fitted jointly from the
 * network part of each reply, whatever the payload sizes. No sockets.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createRegistry, expectedCompletionMs, mulberry32, onReply, type Registry, upsertAgent } from '@edge-mesh/router';

/** One agent, one model; nothing measured yet. */
function oneAgent(): Registry {
  const reg = createRegistry({ site: 'near', exploreRate: 0 });
  upsertAgent(reg, { agentId: 'a', hardwareClass: 'cpu', site: 'near', models: [{ model: 'det', serviceMs: 5 }] }, 0);
  return reg;
}

/** Replies whose network time is rttMs + bytes / bytesPerMs (± 2 % jitter), at the sizes given in turn. */
function feed(reg: Registry, sizes: number[], rttMs: number, bytesPerMs: number, count: number): void {
  const rng = mulberry32(42);
  for (let i = 0; i < count; i++) {
    const bytes = sizes[i % sizes.length]!;
    const networkMs = (rttMs + bytes / bytesPerMs) * (1 + 0.04 * (rng() - 0.5));
    onReply(reg, 'a', 'det', { queueMs: 3, execMs: 5, e2eMs: 3 + 5 + networkMs, bytes }, 10 * i);
  }
}

test('payloads all ≥ 16 KB: RTT and transfer rate are both learned, and 1 MB is predicted as it takes', () => {
  // 10 ms RTT, 6,667 bytes/ms (53 Mb/s): 1 MB takes 160 ms. The first reply carries 1 MB, so a learner
  // that seeds the RTT from it with the 10 Mb/s prior (800 ms of transfer) pins the RTT at its floor.
  const reg = oneAgent();
  feed(reg, [1_000_000, 20_000, 100_000, 20_000], 10, 6_667, 200);
  const a = reg.agents.get('a')!;
  assert.ok(Math.abs(a.rttMs - 10) < 1, `RTT ${a.rttMs} ms, want 10`);
  assert.ok(Math.abs(a.bytesPerMs - 6_667) / 6_667 < 0.05, `rate ${a.bytesPerMs} bytes/ms, want 6,667`);
  const entry = a.models.get('det')!;
  const service = expectedCompletionMs(entry, { model: 'det' }, 2_000) - a.rttMs;
  const predicted1MB = expectedCompletionMs(entry, { model: 'det', bytesUp: 1_000_000 }, 2_000) - service;
  assert.ok(Math.abs(predicted1MB - 160) < 8, `1 MB predicted to take ${predicted1MB} ms on the network, want 160`);
});

test('small payloads only: the RTT is learned, and the times at those sizes are right', () => {
  const reg = oneAgent();
  feed(reg, [200, 1_000, 4_000], 3, 6_667, 100);
  const a = reg.agents.get('a')!;
  assert.ok(Math.abs(a.rttMs - 3) < 0.3, `RTT ${a.rttMs} ms, want about 3`);
  for (const bytes of [200, 4_000]) {
    const predicted = a.rttMs + bytes / a.bytesPerMs;
    const measured = 3 + bytes / 6_667;
    assert.ok(Math.abs(predicted - measured) < 0.3, `${bytes} bytes: predicted ${predicted} ms, measured ${measured}`);
  }
});

test('one large size only: the network time at that size is what was measured', () => {
  const reg = oneAgent();
  feed(reg, [500_000], 10, 6_667, 100);
  const a = reg.agents.get('a')!;
  const predicted = a.rttMs + 500_000 / a.bytesPerMs;
  assert.ok(Math.abs(predicted - 85) < 3, `500 KB predicted ${predicted} ms on the network, measured 85`);
  // Nothing tells RTT from transfer at one size: the RTT stays near its prior (4 ms between agents at the
  // router's site) rather than at the floor, and the transfer takes the rest.
  assert.ok(Math.abs(a.rttMs - 4) < 1, `RTT ${a.rttMs} ms, want about the 4 ms prior`);
});

test('the fit follows a change of link, and one wild sample barely moves it', () => {
  const reg = oneAgent();
  feed(reg, [1_000_000, 20_000, 100_000], 10, 6_667, 150);
  const a = reg.agents.get('a')!;
  const before = a.rttMs + 1_000_000 / a.bytesPerMs;
  onReply(reg, 'a', 'det', { queueMs: 0, execMs: 5, e2eMs: 5 + 3_000, bytes: 20_000 }, 1_500);
  const after = a.rttMs + 1_000_000 / a.bytesPerMs;
  assert.ok(Math.abs(after - before) < 5, `one 3 s outlier moved the 1 MB prediction from ${before} to ${after} ms`);
  // The link slows to a quarter of its rate: after three τ (90 s) of replies the fit has the new rate.
  const rng = mulberry32(7);
  for (let i = 0; i < 450; i++) {
    const bytes = [1_000_000, 20_000, 100_000][i % 3]!;
    const networkMs = (10 + bytes / 1_667) * (1 + 0.04 * (rng() - 0.5));
    onReply(reg, 'a', 'det', { queueMs: 0, execMs: 5, e2eMs: 5 + networkMs, bytes }, 2_000 + 200 * i);
  }
  assert.ok(Math.abs(a.bytesPerMs - 1_667) / 1_667 < 0.1, `rate ${a.bytesPerMs}, want 1,667 after the change`);
});
