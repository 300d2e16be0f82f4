/**
 * MQTT over WebSocket on the broker (docs/operations.md, "MQTT over WebSocket"): the same broker, identities, ACLs
 * and limits on a second port, for clients that can only open WebSockets. The agent stays on TCP; the app comes in
 * over ws:// and is served through the same broker.
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { sampleInputs } from '@edge-mesh/demo';
import { admit, generateIdentity, MeshError, makeConnectToken } from '@edge-mesh/protocol';
import mqtt from 'mqtt';
import { WebSocket } from 'ws';
import { connectPacket } from './broker-fixtures.ts';
import { agentFor, brokerFor, meshFor, tempDir } from './helpers.ts';

async function wsBroker(t: Parameters<typeof brokerFor>[0]) {
  const operator = generateIdentity('operator');
  const broker = await brokerFor(t, {
    auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], dataDir: await tempDir(t) },
    wsPort: 0,
    maxPacketBytes: 64 * 1024,
  });
  assert.match(broker.wsUrl ?? '', /^ws:\/\/127\.0\.0\.1:\d+\/mqtt$/);
  return { broker, operator, wsUrl: broker.wsUrl! };
}

test('an app over MQTT over WebSocket is served by an agent on TCP, through the same broker and checks', { timeout: 60_000 }, async (t) => {
  const { broker, operator, wsUrl } = await wsBroker(t);
  const [agentKey, appKey] = [generateIdentity('agent'), generateIdentity('app')];
  for (const id of [agentKey, appKey]) await broker.admit(admit(operator, id));
  const agent = await agentFor(t, { brokerUrl: broker.url, identity: agentKey });
  const mesh = await meshFor(t, { brokerUrl: wsUrl, identity: appKey });
  await mesh.waitForModel('kws', 20_000);
  const result = await mesh.infer('kws', sampleInputs('kws', 0), { deadlineMs: 10_000 });
  assert.equal(result.agentId, agent.id);
  assert.ok(Object.keys(result.outputs).length > 0);

  // A key nobody admitted is refused over WebSocket as over TCP, at once and with a code.
  await assert.rejects(
    meshFor(t, { brokerUrl: wsUrl, identity: generateIdentity('app'), connectTimeoutMs: 5_000 }),
    (err: unknown) => err instanceof MeshError && err.code === 'MESH_UNAUTHORIZED',
  );
});

test('hostile WebSocket clients: an anonymous CONNECT, an oversized frame and a plain HTTP request; the broker keeps serving', {
  timeout: 30_000,
}, async (t) => {
  const { broker, operator, wsUrl } = await wsBroker(t);
  // Anonymous CONNECT over WebSocket: refused, as on TCP.
  const anonymous = mqtt.connect(wsUrl, { clientId: 'anon', protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 3000 });
  const refused = await new Promise<Error>((resolve) => anonymous.once('error', resolve));
  anonymous.end(true);
  assert.match(refused.message, /Not authorized|Identifier rejected/i, 'refused as on TCP (CONNACK 5 or 2)');

  // A frame larger than the broker's packet cap: the WebSocket is closed (1009, too big) before it is buffered.
  const big = new WebSocket(wsUrl, ['mqtt']);
  await new Promise((resolve, reject) => {
    big.once('open', resolve);
    big.once('error', reject);
  });
  const closed = new Promise<number>((resolve) => big.once('close', (code) => resolve(code)));
  big.on('error', () => {});
  big.send(Buffer.alloc(256 * 1024, 0x30));
  assert.equal(await closed, 1009);

  // A garbage MQTT stream over WebSocket: dropped by the framing guard.
  const junk = new WebSocket(wsUrl, ['mqtt']);
  await new Promise((resolve) => junk.once('open', resolve));
  const junkClosed = new Promise((resolve) => junk.once('close', resolve));
  junk.on('error', () => {});
  junk.send(Buffer.from('GET / HTTP/1.1\r\n\r\n'));
  await junkClosed;

  // Plain HTTP on the WebSocket port says what the port is for.
  const res = await fetch(wsUrl.replace(/^ws:/, 'http:'));
  assert.equal(res.status, 426);
  assert.match(await res.text(), /MQTT over WebSocket/);

  // Still serving: an admitted app connects over WebSocket and the raw CONNACK is 0.
  const app = generateIdentity('app');
  await broker.admit(admit(operator, app));
  const ok = new WebSocket(wsUrl, ['mqtt']);
  await new Promise((resolve) => ok.once('open', resolve));
  // MQTT over WebSocket lets a packet span frames (aedes writes a packet's header and body separately).
  const received: Buffer[] = [];
  const connackIn = new Promise<Buffer>((resolve) =>
    ok.on('message', (d) => {
      received.push(d as Buffer);
      const all = Buffer.concat(received);
      if (all.length >= 4) resolve(all);
    }),
  );
  ok.send(connectPacket({ clientId: app.id, username: app.id, password: makeConnectToken(app) }));
  const connack = await connackIn;
  ok.close();
  assert.deepEqual([...connack], [0x20, 0x02, 0x00, 0x00]);
});
