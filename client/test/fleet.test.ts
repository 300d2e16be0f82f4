/** The fleet view's liveness rule (client/src/fleet.ts): heartbeat periods as received, and silence. No sockets. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { encodeMessage } from '@edge-mesh/protocol';
import { createFleetView } from '../src/index.ts';

const status = (agent: string, state: 'online' | 'offline', session = 's1') =>
  encodeMessage({ v: 1, kind: 'status', agent, state, ts: 0, session, models: [] });
const load = (agent: string, seq: number) =>
  encodeMessage({ v: 1, kind: 'load', agent, ts: 0, seq, queued: 0, inFlight: 0, workers: 1, models: {} });

test('an online agent is silent after three of its heartbeat periods (at least 1 s) with nothing heard, while others are heard', () => {
  let now = 0;
  const fleet = createFleetView({ requireSignedStatus: false, now: () => now });
  fleet.onStatus('agent-a', status('agent-a', 'online'));
  fleet.onStatus('agent-b', status('agent-b', 'online'));
  /** agent-b keeps talking, so this side's link is known to work. */
  const at = (t: number) => {
    now = t;
    fleet.heard('agent-b');
  };
  at(60_000);
  assert.equal(fleet.silent('agent-a'), false, 'its period is not known yet: never judged');
  for (let seq = 1; seq <= 5; seq++) {
    now = 60_000 + 500 * seq;
    fleet.onLoad('agent-a', load('agent-a', seq));
  }
  assert.equal(fleet.get('agent-a')!.heartbeatMs, 500);
  at(now + 1_500);
  assert.equal(fleet.silent('agent-a'), false, 'three periods: not yet');
  at(now + 1);
  assert.equal(fleet.silent('agent-a'), true);
  fleet.heard('agent-a');
  assert.equal(fleet.silent('agent-a'), false, 'a reply is a sign of life');
  at(now + 1_501);
  assert.equal(fleet.silent('agent-a'), true);

  // A fast heartbeat is still given a second; a new session starts its period afresh; offline is not silent.
  for (let seq = 6; seq <= 17; seq++) {
    now += 50;
    fleet.onLoad('agent-a', load('agent-a', seq));
  }
  assert.ok(fleet.get('agent-a')!.heartbeatMs < 500);
  at(now + 999);
  assert.equal(fleet.silent('agent-a'), false);
  at(now + 2);
  assert.equal(fleet.silent('agent-a'), true);
  fleet.onStatus('agent-a', status('agent-a', 'online', 's2'));
  assert.ok(Number.isNaN(fleet.get('agent-a')!.heartbeatMs));
  at(now + 60_000);
  assert.equal(fleet.silent('agent-a'), false);
  fleet.onStatus('agent-a', status('agent-a', 'offline', 's2'));
  assert.equal(fleet.silent('agent-a'), false);
  assert.equal(fleet.silent('agent-nobody'), false);
});

test('when every agent goes quiet at once, it is this side that stalled: nobody is presumed dead', () => {
  let now = 0;
  const fleet = createFleetView({ requireSignedStatus: false, now: () => now });
  for (const id of ['agent-a', 'agent-b']) fleet.onStatus(id, status(id, 'online'));
  for (let seq = 1; seq <= 4; seq++) {
    now = 200 * seq;
    for (const id of ['agent-a', 'agent-b']) fleet.onLoad(id, load(id, seq));
  }
  now += 5_000;
  assert.equal(fleet.silent('agent-a'), false);
  assert.equal(fleet.silent('agent-b'), false);
  // The link comes back: agent-b speaks first; agent-a, quiet all along, is judged once b was heard.
  fleet.onLoad('agent-b', load('agent-b', 5));
  assert.equal(fleet.silent('agent-a'), true);
  assert.equal(fleet.silent('agent-b'), false);
});
