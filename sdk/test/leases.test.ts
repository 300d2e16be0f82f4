/** The SDK's route leases (sdk/src/leases.ts) against a router that does not answer. No sockets: `ask` is a fake. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SILENT_LOGGER } from '@edge-mesh/client';
import { encodeMessage } from '@edge-mesh/protocol';
import { createLeaseBook } from '../src/leases.ts';

function bookFor(sendable = true) {
  let t = 10_000;
  const asked: { id: Uint8Array; model: string }[] = [];
  const book = createLeaseBook({
    router: 'router-1',
    timeoutMs: 20,
    now: () => t,
    logger: SILENT_LOGGER,
    // The lowest jitter: the waits after misses in a row are 1 s, 2 s, 4 s, …
    random: () => 0,
    ask(id, model, _budgetMs, _bytes, sent) {
      asked.push({ id, model });
      sent(sendable);
    },
  });
  const answer = (agents: string[]) =>
    book.onLeaseMessage(
      encodeMessage({
        v: 1,
        kind: 'lease',
        id: asked.at(-1)!.id,
        router: 'router-1',
        model: 'kws',
        agents: agents.map((agent) => ({ agent, predictedMs: 10, serviceMs: 10, timeoutMs: 100, hedgeAfterMs: 50 })),
        ttlMs: 500,
        ...(agents.length === 0 ? { code: 'MESH_NO_AGENT', message: 'no agent' } : {}),
      }),
    );
  return {
    book,
    asked,
    answer,
    at: (ms: number) => {
      t = ms;
    },
  };
}

test('a router that never answers costs one wait for requests in a row, not one each, and is asked again after a while', async () => {
  const { book, asked, answer, at } = bookFor();
  for (let i = 0; i < 10; i++) assert.equal(await book.leaseFor('kws', 500, 100), undefined);
  assert.equal(asked.length, 1, 'one question, one timeout');
  // Another model is asked about on its own.
  assert.equal(await book.leaseFor('other', 500, 100), undefined);
  assert.equal(asked.length, 2);
  at(10_999);
  assert.equal(await book.leaseFor('kws', 500, 100), undefined);
  assert.equal(asked.length, 2);
  // A second later it is asked again; another miss doubles the wait.
  at(11_000);
  assert.equal(await book.leaseFor('kws', 500, 100), undefined);
  assert.equal(asked.length, 3);
  at(12_999);
  await book.leaseFor('kws', 500, 100);
  assert.equal(asked.length, 3);
  at(13_000);
  // It answers this time: the lease is used, and the misses are forgotten.
  const leased = book.leaseFor('kws', 500, 100);
  answer(['agent-a']);
  assert.deepEqual(
    (await leased)?.agents.map((a) => a.agent),
    ['agent-a'],
  );
  assert.equal(asked.length, 4);
  // Past the lease's use (4 × 500 ms) it has no agent: an empty lease is a miss too, and the wait is 1 s again.
  at(15_000);
  const empty = book.leaseFor('kws', 500, 100);
  answer([]);
  assert.equal(await empty, undefined);
  assert.equal(asked.length, 5);
  at(15_999);
  assert.equal(await book.leaseFor('kws', 500, 100), undefined);
  assert.equal(asked.length, 5);
  at(16_000);
  await book.leaseFor('kws', 500, 100);
  assert.equal(asked.length, 6);
});

test('a question that could not be sent (no connection) is no miss: the next request asks again', async () => {
  const { book, asked } = bookFor(false);
  for (let i = 0; i < 3; i++) assert.equal(await book.leaseFor('kws', 500, 100), undefined);
  assert.equal(asked.length, 3);
});
