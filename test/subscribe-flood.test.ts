/**
 * A SUBSCRIBE flood (issue 13): every filter asked for gets its own SUBACK return code (MQTT 3.1.1 [MQTT-3.9.3-1]),
 * 0x80 for a refused one, duplicates included, and the connection stays up. aedes answered a SUBSCRIBE with duplicate
 * filters with one code for them all, and mqtt.js closed the connection on that short SUBACK.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type Identity, makeConnectToken, topics } from '@edge-mesh/protocol';
import {
  type AuthBroker,
  admitted,
  assertServing,
  authBrokerFor,
  cleanup,
  connect,
  connectPacket,
  type Defer,
  frame,
  type Raw,
  rawSocket,
  str,
  withTimeout,
} from './broker-fixtures.ts';

const authBroker = authBrokerFor('subflood-');

function subscribePacket(filters: string[], messageId: number, qos = 1): Buffer {
  return frame(
    0x82,
    Buffer.concat([Buffer.from([messageId >> 8, messageId & 0xff]), ...filters.flatMap((f) => [str(f), Buffer.from([qos])])]),
  );
}

/** The SUBACKs in `bytes`: message id and return codes of each, in order; anything else fails. */
function subacks(bytes: Buffer): { id: number; codes: number[] }[] {
  const out: { id: number; codes: number[] }[] = [];
  let at = 0;
  while (at < bytes.length) {
    assert.equal(bytes[at], 0x90, `byte ${at} starts a SUBACK`);
    let length = 0;
    let shift = 0;
    let i = at + 1;
    for (;;) {
      const b = bytes[i++]!;
      length += (b & 0x7f) << shift;
      shift += 7;
      if (b < 0x80) break;
    }
    if (i + length > bytes.length) break;
    out.push({ id: bytes.readUInt16BE(i), codes: [...bytes.subarray(i + 2, i + length)] });
    at = i + length;
  }
  return out;
}

async function connectedRaw(defer: Defer, ab: AuthBroker, who: Identity): Promise<Raw> {
  const raw = await rawSocket(defer, ab.b);
  raw.socket.write(connectPacket({ clientId: who.id, username: who.id, password: makeConnectToken(who) }));
  const deadline = Date.now() + 3_000;
  while (raw.bytes().length < 4 && !raw.isClosed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  assert.deepEqual([...raw.bytes()], [0x20, 2, 0, 0], 'CONNACK accepted');
  raw.received.length = 0;
  return raw;
}

test('a SUBSCRIBE flood with refused and duplicate filters: one SUBACK code per filter, 0x80 where refused, the connection stays up', {
  timeout: 30_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const app = await admitted(ab, 'app');
  const raw = await connectedRaw(defer, ab, app);
  const mine = topics.clientRepliesFor(app.id); // allowed for an app
  const theirs = topics.agentRequestsFor('agent-someone'); // another party's requests: refused by the ACL
  const packets: { filters: string[]; codes: number[] }[] = [
    { filters: [theirs], codes: [0x80] },
    { filters: [theirs, theirs, theirs], codes: [0x80, 0x80, 0x80] },
    { filters: ['#', mine, '#'], codes: [0x80, 1, 0x80] },
    { filters: [mine, mine], codes: [1, 1] },
    { filters: Array.from({ length: 200 }, () => theirs), codes: Array.from({ length: 200 }, () => 0x80) },
  ];
  const flood = 1_000;
  const sent: { id: number; codes: number[] }[] = [];
  for (let n = 0; n < flood; n++) {
    const p = packets[n % packets.length]!;
    const id = (n % 65_535) + 1;
    raw.socket.write(subscribePacket(p.filters, id));
    sent.push({ id, codes: p.codes });
  }
  // Each SUBACK: its type byte, its remaining length (one byte up to 127, two beyond), the message id, one code a filter.
  const expectedBytes = sent.reduce((sum, s) => sum + 1 + (s.codes.length + 2 > 127 ? 2 : 1) + 2 + s.codes.length, 0);
  await withTimeout(
    (async () => {
      while (raw.bytes().length < expectedBytes && !raw.isClosed()) await new Promise((r) => setTimeout(r, 10));
    })(),
    20_000,
    'all SUBACKs',
  );
  assert.ok(!raw.isClosed(), 'the broker kept the connection');
  assert.equal(raw.bytes().length, expectedBytes, 'no byte more than the SUBACKs');
  // One SUBACK per SUBSCRIBE; a SUBSCRIBE that adds a subscription may be answered after later ones that do not.
  const byId = (a: { id: number }, b: { id: number }) => a.id - b.id;
  const got = subacks(raw.bytes());
  // It failed now and then with the last SUBACKs missing: the wait above counted one byte too few a SUBACK, so it could
  // stop before the last thousand bytes came. Should anything differ again, say which ids, and how.
  const expectedOf = new Map(sent.map((x) => [x.id, x.codes.join()]));
  const ids = got.map((g) => g.id);
  const differing = [
    ...ids.filter((id, i) => ids.indexOf(id) !== i).map((id) => `${id} twice`),
    ...sent.filter((x) => !ids.includes(x.id)).map((x) => `${x.id} missing (${x.codes.length} codes)`),
    ...got
      .filter((g) => expectedOf.get(g.id) !== g.codes.join())
      .map((g) => `${g.id}: ${g.codes.length} codes, expected ${sent.find((x) => x.id === g.id)?.codes.length}`),
  ];
  assert.deepEqual(differing, [], `${raw.bytes().length} bytes of ${expectedBytes} expected, ${got.length} SUBACKs parsed`);
  assert.deepEqual(got.sort(byId), sent.sort(byId));
  await assertServing(defer, ab, 2_000);
});

test('mqtt.js: duplicate filters no longer close the client; a reply on a twice-subscribed filter arrives once', {
  timeout: 30_000,
}, async (t) => {
  const defer = cleanup(t);
  const ab = await authBroker(defer);
  const app = await admitted(ab, 'app');
  const agent = await admitted(ab, 'agent');
  const c = await connect(defer, ab.b, app);
  const mine = topics.clientRepliesFor(app.id);
  const subscribe = (filters: string[]) =>
    new Promise<{ err: string | undefined; granted: number[] | undefined }>((resolve) =>
      c.subscribe(filters, { qos: 1 }, (err, g) => resolve({ err: err?.message, granted: g?.map((x) => x.qos) })),
    );
  const theirs = topics.agentRequestsFor(agent.id);
  const refused = await subscribe(Array.from({ length: 100 }, () => theirs));
  assert.match(refused.err ?? '', /Subscribe error/);
  assert.ok(c.connected, 'still connected after 100 refused duplicates');
  assert.deepEqual(await subscribe([mine, mine]), { err: undefined, granted: [1, 1] });
  assert.ok(c.connected, 'still connected');
  const got: string[] = [];
  c.on('message', (topic) => got.push(topic));
  const a = await connect(defer, ab.b, agent);
  await a.publishAsync(topics.clientReply(app.id, agent.id), 'x', { qos: 1 });
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(got, [topics.clientReply(app.id, agent.id)]);
  assert.ok(c.connected);
});
