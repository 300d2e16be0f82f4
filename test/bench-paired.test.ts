/**
 * The throughput bench's placement report (`modelPlacement`) and its paired phase (bench/throughput.ts, `pairedRatios`): the agent and the echo agent served in
 * turns, each agent slice set against the echo slices either side of it.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { modelPlacement, pairedRatios } from '../bench/throughput.ts';

test('a load that drifts steadily over the run cancels out of the paired ratios', () => {
  // The machine slows by 2 % a slice; the agent serves 0.8 of what the echo agent serves at the same moment.
  const slices = Array.from({ length: 12 }, (_, k) => ({ agent: k % 2, rps: 10_000 * (1 - 0.02 * k) * (k % 2 === 0 ? 0.8 : 1) }));
  const ratios = pairedRatios(slices);
  assert.equal(ratios.length, 6);
  for (const r of ratios.slice(1)) assert.ok(Math.abs(r - 0.8) < 1e-9, `ratio ${r}`);
  // The first agent slice has an echo slice on one side only, so the drift shows in it (0.8 ÷ 0.98).
  assert.ok(Math.abs(ratios[0]! - 0.8 / 0.98) < 1e-9);
  // Set against the echo slice after it alone, every ratio would carry the drift.
  const oneSided = slices.flatMap((s, k) => (s.agent === 0 ? [s.rps / slices[k + 1]!.rps] : []));
  assert.ok(oneSided.every((r) => r < 0.8 * 1.03 && r > 0.8 * 1.015));
});

test('slices without an echo neighbour, or whose echo neighbours served nothing, give no ratio', () => {
  assert.deepEqual(pairedRatios([{ agent: 0, rps: 5 }]), []);
  assert.deepEqual(
    pairedRatios([
      { agent: 0, rps: 5 },
      { agent: 1, rps: 0 },
      { agent: 0, rps: 5 },
    ]),
    [],
  );
  assert.deepEqual(
    pairedRatios([
      { agent: 1, rps: 10 },
      { agent: 0, rps: 0 },
      { agent: 1, rps: 10 },
    ]),
    [0],
  );
});

test("the bench reads where the agent put the model from the agent's own log lines", () => {
  const line = (o: object) => JSON.stringify({ level: 30, part: 'agent', ...o });
  const stacked = [
    line({ model: 'vad', reason: 'inputs without a fixed shape', msg: 'model runs on the worker pool' }),
    line({ model: 'kws', p99Ms: 0.149, inlineMaxMs: 0.5, msg: 'model runs inline' }),
    line({ model: 'kws', rowMs: 0.013, aloneMs: 0.046, batchMax: 16, msg: 'model runs stacked when requests wait together' }),
    'not json',
  ];
  assert.deepEqual(modelPlacement(stacked, 'kws'), { runs: 'inline', stacks: true });
  assert.deepEqual(modelPlacement(stacked, 'vad'), { runs: 'pool', reason: 'inputs without a fixed shape' });
  assert.equal(modelPlacement(stacked, 'ocr-det'), undefined);
  const alone = [
    line({ model: 'kws', p99Ms: 0.2, inlineMaxMs: 0.5, msg: 'model runs inline' }),
    line({ model: 'kws', reason: 'a row of a stacked run costs 0.04 ms', msg: 'model runs one request at a time' }),
  ];
  assert.deepEqual(modelPlacement(alone, 'kws'), { runs: 'inline', stacks: false, reason: 'a row of a stacked run costs 0.04 ms' });
  // A stacking line without the placement line before it (kept lines cut short) says nothing.
  assert.equal(modelPlacement(alone.slice(1), 'kws'), undefined);
  // The messages are the agent's: renaming one there without here fails this test.
  const source = readFileSync(new URL('../edge-agent/src/executors.ts', import.meta.url), 'utf8');
  for (const msg of [
    'model runs inline',
    'model runs on the worker pool',
    'model runs stacked when requests wait together',
    'model runs one request at a time',
  ])
    assert.ok(source.includes(`'${msg}'`), msg);
});
