/** The router's per-try timeouts and hedge delays from each node's own latency history (client/src/quantiles.ts). No sockets. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { mulberry32 } from '@edge-mesh/client';
import { createRegistry, hedgeDelayMs, onReply, perTryTimeoutMs, upsertAgent } from '@edge-mesh/router';

/** Lognormal latencies, median `medianMs`, σ = 0.3 (exp of a Box–Muller normal). */
function lognormal(seed: number, medianMs: number) {
  const rng = mulberry32(seed);
  return () => medianMs * Math.exp(0.3 * Math.sqrt(-2 * Math.log(1 - rng())) * Math.cos(2 * Math.PI * rng()));
}

test('the router times each node by its own history: a fast node is given up on sooner than a slow one', () => {
  const reg = createRegistry({ site: 'near' });
  for (const id of ['fast', 'slow']) upsertAgent(reg, { agentId: id, hardwareClass: 'cpu', models: [{ model: 'kws', serviceMs: 5 }] }, 0);
  const fastMs = lognormal(3, 8);
  const slowMs = lognormal(4, 120);
  for (let i = 0; i < 200; i++) {
    onReply(reg, 'fast', 'kws', { queueMs: 0, execMs: 5, e2eMs: fastMs() }, i);
    onReply(reg, 'slow', 'kws', { queueMs: 0, execMs: 5, e2eMs: slowMs() }, i);
  }
  const fast = reg.agents.get('fast')!.models.get('kws')!;
  const slow = reg.agents.get('slow')!.models.get('kws')!;
  // Same prediction for both, so only the history tells them apart.
  assert.equal(perTryTimeoutMs(reg, 10, Number.POSITIVE_INFINITY, fast), 50, 'floor: the fast node p99 is about 16 ms');
  const slowTimeout = perTryTimeoutMs(reg, 10, Number.POSITIVE_INFINITY, slow);
  assert.equal(slowTimeout, 250, 'the slow node p99 (about 240 ms) is above the old rule, which bounds it');
  assert.ok(
    hedgeDelayMs(fast, 10) < 25 && hedgeDelayMs(slow, 10) > 150,
    `hedge after ${hedgeDelayMs(fast, 10)} / ${hedgeDelayMs(slow, 10)}`,
  );
});
