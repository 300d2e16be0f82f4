/**
 * A client's last will is the last word the broker lets out for it (broker/src/will-order.ts). A process killed with
 * unread bytes in its socket resets the connection; aedes then publishes the will at once, while the retained status
 * the client sent just before could still be on its way through the broker. Without the hold, 8 of 20 such clients
 * ended with their "online" status retained after their will, a dead agent every later router took for alive.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import test from 'node:test';
import { generateIdentity, topics } from '@edge-mesh/protocol';
import mqtt from 'mqtt';
import mqttPacket from 'mqtt-packet';
import { brokerFor, waitFor } from './helpers.ts';

const packet = (p: object) => mqttPacket.generate(p as mqttPacket.Packet);

/** Connects with a retained "offline" will, publishes load reports and a retained "online" status, then resets. */
async function dieAfterStatus(port: number, id: string, end: 'reset' | 'destroy' | 'end'): Promise<void> {
  const topic = topics.agentStatus(id);
  const socket = net.connect(port, '127.0.0.1');
  socket.on('error', () => {});
  await new Promise((resolve) => socket.once('connect', resolve));
  socket.write(
    packet({
      cmd: 'connect',
      protocolId: 'MQTT',
      protocolVersion: 4,
      clean: true,
      clientId: id,
      keepalive: 30,
      will: { topic, payload: Buffer.from('offline'), qos: 1, retain: true },
    }),
  );
  await new Promise((resolve) => socket.once('data', resolve));
  await new Promise((resolve) => setTimeout(resolve, Math.random() * 30));
  for (let i = 0; i < 3; i++) socket.write(packet({ cmd: 'publish', topic: topics.agentLoad(id), payload: Buffer.alloc(200), qos: 0 }));
  socket.write(packet({ cmd: 'publish', topic, payload: Buffer.from('online'), qos: 1, messageId: 1, retain: true }));
  if (end === 'reset') socket.resetAndDestroy();
  else if (end === 'destroy') socket.destroy();
  else socket.end();
}

test('a client that dies right after publishing its status: its will is the last status seen live and retained', async (t) => {
  const broker = await brokerFor(t);
  const port = Number(new URL(broker.url).port);
  const watcher = await mqtt.connectAsync(broker.url, { clientId: 'watcher' });
  t.after(() => watcher.endAsync());
  const live = new Map<string, string[]>();
  watcher.on('message', (topic, payload) => live.set(topic, [...(live.get(topic) ?? []), payload.toString()]));
  await watcher.subscribeAsync(topics.agentStatus('+'), { qos: 1 });

  const ends = ['reset', 'destroy', 'end'] as const;
  const ids = Array.from({ length: 45 }, () => generateIdentity('agent').id);
  await Promise.all(ids.map((id, i) => dieAfterStatus(port, id, ends[i % 3]!)));
  const lastOf = (id: string) => live.get(topics.agentStatus(id))?.at(-1);
  await waitFor(() => ids.every((id) => lastOf(id) === 'offline'), 5_000, 'every will seen last').catch(() => {});
  const wrong = ids.flatMap((id, i) => (lastOf(id) === 'offline' ? [] : [`${ends[i % 3]}: ${live.get(topics.agentStatus(id))}`]));
  assert.deepEqual(wrong, [], 'a status delivered after the will');

  const late = await mqtt.connectAsync(broker.url, { clientId: 'late-router' });
  t.after(() => late.endAsync());
  const retained = new Map<string, string>();
  late.on('message', (topic, payload) => retained.set(topic, payload.toString()));
  await late.subscribeAsync(topics.agentStatus('+'), { qos: 1 });
  await waitFor(() => retained.size === ids.length, 5_000, 'every retained status');
  assert.deepEqual(
    ids.filter((id) => retained.get(topics.agentStatus(id)) !== 'offline'),
    [],
    'a retained status that says a dead client is online',
  );
});

test('a client that lives on is not held back: its statuses go out in order and nothing it sends is refused', async (t) => {
  const broker = await brokerFor(t);
  const id = generateIdentity('agent').id;
  const topic = topics.agentStatus(id);
  const watcher = await mqtt.connectAsync(broker.url, { clientId: 'watcher' });
  t.after(() => watcher.endAsync());
  const seen: string[] = [];
  watcher.on('message', (_topic, payload) => seen.push(payload.toString()));
  await watcher.subscribeAsync(topic, { qos: 1 });
  const client = await mqtt.connectAsync(broker.url, {
    clientId: id,
    will: { topic, payload: Buffer.from('offline'), qos: 1, retain: true },
  });
  for (let i = 0; i < 20; i++) await client.publishAsync(topic, `online ${i}`, { qos: 1, retain: true });
  await client.endAsync();
  await waitFor(() => seen.length === 20, 5_000, 'twenty statuses');
  assert.deepEqual(
    seen,
    Array.from({ length: 20 }, (_, i) => `online ${i}`),
    'a clean disconnect sends no will, and loses nothing',
  );
});
