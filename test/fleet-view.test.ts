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
