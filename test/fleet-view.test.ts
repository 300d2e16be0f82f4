/**
 * The fleet view (client/src/fleet.ts) takes signed statuses as the broker hands them over, in whatever order the
 * engine delivers them. A last will names the session it ends; a late one must not take down the agent's next session.
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { createFleetView } from '@edge-mesh/client';
import { type AgentStatus, encodeMessage, generateIdentity, PROTOCOL_VERSION, signStatus } from '@edge-mesh/protocol';

const identity = generateIdentity('agent');
const status = (session: string, state: AgentStatus['state'], ts: number) =>
  encodeMessage(
    signStatus(identity, {
      v: PROTOCOL_VERSION,
      kind: 'status',
      agent: identity.id,
      state,
      ts,
      session,
      models: [{ name: 'kws', version: '1', sha256: '0'.repeat(64), priceMicros: 0, latencyMs: 1, inputs: [], outputs: [] }],
    }),
  );

test("a restarted agent's old last will, arriving after the new session's announcement, leaves the agent online", () => {
  const lost: string[] = [];
  const fleet = createFleetView({ onAgentLost: (agentId, reason) => lost.push(`${agentId} ${reason}`) });
  fleet.onStatus(identity.id, status('old', 'online', 1_000));
  // The old process is killed; the new one announces before the engine publishes the old one's will.
  fleet.onStatus(identity.id, status('new', 'online', 5_000));
  assert.deepEqual(lost, [`${identity.id} restarted`], 'the old session ends with the new announcement');
  fleet.onStatus(identity.id, status('old', 'offline', 1_000));
  assert.equal(fleet.get(identity.id)?.status.state, 'online');
  assert.equal(fleet.get(identity.id)?.status.session, 'new');
  assert.deepEqual(
    fleet.online('kws').map((a) => a.id),
    [identity.id],
  );
  assert.equal(fleet.counters.staleOffline, 1);
  assert.equal(lost.length, 1, 'no work of the live session is failed');

  // The new session's own will still ends it.
  fleet.onStatus(identity.id, status('new', 'offline', 5_000));
  assert.equal(fleet.get(identity.id)?.status.state, 'offline');
  assert.deepEqual(lost, [`${identity.id} restarted`, `${identity.id} offline`]);
  assert.deepEqual(fleet.online('kws'), []);
});

test('an offline status for an agent already offline, or never seen, is taken as it is', () => {
  const fleet = createFleetView();
  fleet.onStatus(identity.id, status('a', 'offline', 1_000));
  assert.equal(fleet.get(identity.id)?.status.state, 'offline');
  fleet.onStatus(identity.id, status('b', 'offline', 2_000));
  assert.equal(fleet.get(identity.id)?.status.session, 'b');
  assert.equal(fleet.counters.staleOffline, 0);
});

test("a retained copy of an agent's online status that comes after its live will leaves the agent offline", () => {
  // The order a router subscribing to a busy fleet saw (test/router-fleet.test.ts): the agent's announcement live, then
  // its will live, then the retained copy of the announcement the broker had queued for the new subscription.
  const lost: string[] = [];
  const fleet = createFleetView({ onAgentLost: (agentId, reason) => lost.push(`${agentId} ${reason}`) });
  fleet.onConnect();
  fleet.onStatus(identity.id, status('s', 'online', 1_000), false);
  fleet.onStatus(identity.id, status('s', 'offline', 900), false);
  fleet.onStatus(identity.id, status('s', 'online', 1_000), true);
  assert.equal(fleet.get(identity.id)?.status.state, 'offline');
  assert.deepEqual(fleet.online('kws'), []);
  assert.equal(fleet.counters.staleRetained, 1);
  assert.deepEqual(lost, [`${identity.id} offline`]);

  // The same copy on a new connection is what the broker holds now: taken. (A real broker would hold the will.)
  fleet.onConnect();
  fleet.onStatus(identity.id, status('s', 'online', 1_000), true);
  assert.equal(fleet.get(identity.id)?.status.state, 'online');
  assert.equal(fleet.counters.staleRetained, 1);
});

test("a retained copy of an agent's will that comes after the agent's live announcement leaves the agent online", () => {
  // The agent dropped its connection (the broker kept its will as the retained status), came back within its
  // session and announced again; a router subscribing meanwhile gets the new announcement live before the old copy.
  const fleet = createFleetView();
  fleet.onConnect();
  fleet.onStatus(identity.id, status('s', 'online', 2_000), false);
  fleet.onStatus(identity.id, status('s', 'offline', 900), true);
  assert.equal(fleet.get(identity.id)?.status.state, 'online');
  assert.equal(fleet.counters.staleRetained, 1);
});

test("retained copies are taken before anything live, and another session's retained copy is taken after", () => {
  const fleet = createFleetView();
  fleet.onConnect();
  fleet.onStatus(identity.id, status('s', 'online', 1_000), true);
  fleet.onStatus(identity.id, status('s', 'offline', 900), true);
  assert.equal(fleet.get(identity.id)?.status.state, 'offline', 'two retained copies: the later one is taken');
  fleet.onStatus(identity.id, status('s', 'online', 1_000), false);
  fleet.onStatus(identity.id, status('t', 'online', 3_000), true);
  assert.equal(fleet.get(identity.id)?.status.session, 't', 'a new session is news, however it comes');
  assert.equal(fleet.counters.staleRetained, 0);
});

test('an agent republishing its status in a loop is checked at its byte budget; its latest status is applied, others are not held up', async () => {
  const applied: number[] = [];
  const fleet = createFleetView({
    statusBytesPerSecond: 20_000,
    statusBurstBytes: 10_000,
    onStatus: (s) => {
      if (s.agent === identity.id) applied.push(s.ts);
    },
  });
  const one = status('s', 'online', 0).byteLength;
  const n = 200;
  const started = performance.now();
  for (let i = 1; i <= n; i++) fleet.onStatus(identity.id, status('s', 'online', i));
  // The burst's worth at once (and what refilled while the loop ran), the rest held: only the latest of those is
  // applied, once the budget allows.
  const atOnce = applied.length;
  assert.ok(atOnce >= Math.floor(10_000 / one) && atOnce <= Math.floor(10_000 / one) + 5, `${atOnce} applied at once`);
  assert.equal(fleet.counters.statusDeferred, n - atOnce);
  // Another agent is not held back by the first one's loop.
  const other = generateIdentity('agent');
  fleet.onStatus(
    other.id,
    encodeMessage(signStatus(other, { v: PROTOCOL_VERSION, kind: 'status', agent: other.id, state: 'online', ts: 1, session: 'o' })),
  );
  assert.equal(fleet.get(other.id)?.status.state, 'online');
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  assert.deepEqual(applied.slice(atOnce), [n], 'the held ones: only the latest');
  assert.equal(fleet.get(identity.id)?.status.ts, n);
  assert.ok(performance.now() - started < 1_500);
  // Forgetting the agent (an empty retained status) is never held back.
  fleet.onStatus(identity.id, new Uint8Array(0));
  assert.equal(fleet.get(identity.id), undefined);
});
