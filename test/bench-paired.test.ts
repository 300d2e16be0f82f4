/**
 * The throughput bench's paired phase (bench/throughput.ts, `pairedRatios`): the agent and the echo agent served in
 * turns, each agent slice set against the echo slices either side of it.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pairedRatios } from '../bench/throughput.ts';

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
