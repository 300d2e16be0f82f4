/**
 * The request engine (@edge-mesh/client) on virtual time: a final error from one agent while another
 * attempt of the same request is running does not end the request.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type Attempt, createRequestEngine, type Outcome } from '@edge-mesh/client';
import { MeshError } from '@edge-mesh/protocol';
import { VirtualClock } from './virtual-clock.ts';

/** Agents 'honest' then 'liar' then 'third', in that order; the first attempt is hedged after 10 ms. */
function rig() {
  const clock = new VirtualClock();
  const sent: Attempt<null>[] = [];
  const order = ['honest', 'liar', 'third'];
  const engine = createRequestEngine<null, string>({
    policy: { pick: (_r, tried) => ({ agentId: order.find((a) => !tried.has(a))!, hedgeAfterMs: 10 }) },
    clock,
    transport: { send: (a) => sent.push(a), cancel: () => {} },
  });
  const outcomes: Outcome<null, string>[] = [];
  engine.start({ key: 'r1', deadlineAt: 1_000, data: null, model: 'kws' }, (o) => outcomes.push(o));
  clock.advance(10);
  assert.deepEqual(
    sent.map((a) => [a.agentId, a.kind]),
    [
      ['honest', 'first'],
      ['liar', 'hedge'],
    ],
  );
  return { engine, clock, sent, outcomes };
}

test("a hedge's final error does not end the request while the first attempt runs: its answer wins", () => {
  const { engine, clock, sent, outcomes } = rig();
  engine.fail('r1', 'liar', new MeshError('MESH_INTERNAL', 'made up'));
  assert.equal(outcomes.length, 0, 'still waiting for the honest agent');
  clock.advance(5);
  assert.equal(sent.length, 2, 'no attempt launched after a final error');
  engine.answer('r1', 'honest', 'result');
  assert.equal(outcomes.length, 1);
  assert.ok(outcomes[0]!.ok);
  assert.equal(outcomes[0]!.ok && outcomes[0]!.attempt.agentId, 'honest');
});

test('a final error ends the request with that error once no other attempt is left', () => {
  const { engine, sent, outcomes } = rig();
  engine.fail('r1', 'liar', new MeshError('MESH_BAD_INPUT', 'inputs do not match'));
  // The other attempt fails too, with a code that would otherwise move the request on: no third attempt.
  engine.fail('r1', 'honest', new MeshError('MESH_BUSY', 'queue full'));
  assert.equal(sent.length, 2);
  assert.equal(outcomes.length, 1);
  assert.ok(!outcomes[0]!.ok);
  assert.equal(!outcomes[0]!.ok && outcomes[0]!.error.code, 'MESH_BAD_INPUT');
});

test('a final error with no other attempt running ends the request at once, as before', () => {
  const clock = new VirtualClock();
  const engine = createRequestEngine<null, string>({
    policy: { pick: (_r, tried) => (tried.has('a') ? { agentId: 'b' } : { agentId: 'a' }) },
    clock,
    transport: { send: () => {}, cancel: () => {} },
  });
  const outcomes: Outcome<null, string>[] = [];
  engine.start({ key: 'r1', deadlineAt: 1_000, data: null }, (o) => outcomes.push(o));
  engine.fail('r1', 'a', new MeshError('MESH_BAD_INPUT', 'inputs do not match'));
  assert.equal(outcomes.length, 1);
  assert.equal(!outcomes[0]!.ok && outcomes[0]!.error.code, 'MESH_BAD_INPUT');
});
