/**
 * Fast recovery (issue 13, docs/operations.md "Recovery"): a real broker killed and started again on the
 * same port while the parts keep running.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';
import { type BrokerHandle, startBroker } from '@edge-mesh/broker';
import { brokerList, CLOSE_GRACE_MS, openMeshConnection } from '@edge-mesh/client';
import { sampleInputs } from '@edge-mesh/demo';
import { MeshError, topics } from '@edge-mesh/protocol';
import pino from 'pino';
import { agentFor, brokerFor, kwsOnlyDir, meshFor, quiet, routerFor, tcpRelay } from './helpers.ts';

async function restartableBroker(t: import('node:test').TestContext) {
  let broker: BrokerHandle = await startBroker({ port: 0, logger: quiet });
  const port = broker.port;
  t.after(() => broker.close());
  return {
    url: broker.url,
    port,
    stop: () => broker.close(),
    async start() {
      broker = await startBroker({ port, logger: quiet });
    },
  };
}

test('after a broker outage the SDK takes route leases from the router again', async (t) => {
  const broker = await restartableBroker(t);
  const dir = await kwsOnlyDir(t);
  await agentFor(t, { brokerUrl: broker.url, modelsDir: dir });
  const router = await routerFor(t, broker.url, { leaseTtlMs: 200 });
  await router.waitForModel('kws', 10_000);
  const mesh = await meshFor(t, { brokerUrl: broker.url, router: router.id, backoff: { baseMs: 20, maxMs: 200 } });
  await mesh.waitForModel('kws', 10_000);
  const inputs = sampleInputs('kws', 1);

  for (let i = 0; i < 20; i++) {
    const r = await mesh.infer('kws', inputs, { deadlineMs: 5_000 });
    assert.equal(r.routedBy, router.id, `request ${i} before the outage was not leased`);
  }

  await broker.stop();
  // Once the held lease is past use (4 ttl), requests during the outage ask for one while the SDK is disconnected.
  await new Promise((r) => setTimeout(r, 1_000));
  for (let i = 0; i < 5; i++) {
    await mesh.infer('kws', inputs, { deadlineMs: 300 }).catch(() => undefined);
  }
  assert.ok(mesh.counters.leaseFallbacks >= 5, `requests in the outage went without a lease (${mesh.counters.leaseFallbacks})`);
  await broker.start();

  // Back: the first requests may still be routed locally while the router re-learns the agent.
  const until = Date.now() + 20_000;
  for (;;) {
    const r = await mesh.infer('kws', inputs, { deadlineMs: 2_000 }).catch(() => undefined);
    if (r?.routedBy === router.id) break;
    assert.ok(Date.now() < until, 'no leased request within 20 s of the broker coming back');
    await new Promise((r) => setTimeout(r, 50));
  }
  let leased = 0;
  for (let i = 0; i < 40; i++) {
    const r = await mesh.infer('kws', inputs, { deadlineMs: 5_000 });
    if (r.routedBy === router.id) leased++;
  }
  assert.equal(leased, 40, `${leased}/40 leased after the outage`);
});

/** A plain TCP listener on `port` that notes when each connection arrives and closes it at once (a broker still down). */
async function downBroker(port: number) {
  const arrivals: number[] = [];
  const server = net.createServer((socket) => {
    arrivals.push(performance.now());
    socket.destroy();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve());
  });
  return { arrivals, close: () => new Promise<void>((resolve) => server.close(() => resolve())) };
}

test('a broker restarted on the same port under a request stream: clients retry at once and the stream resumes within 2 s', async (t) => {
  const broker = await restartableBroker(t);
  const dir = await kwsOnlyDir(t);
  // The reconnect delays the agent and the SDK schedule, as they log them.
  const delays: number[] = [];
  const logger = pino(
    { level: 'warn' },
    {
      write: (line: string) => {
        const { delayMs } = JSON.parse(line) as { delayMs?: unknown };
        if (typeof delayMs === 'number') delays.push(delayMs);
      },
    },
  );
  await agentFor(t, { brokerUrl: broker.url, modelsDir: dir, logger });
  const mesh = await meshFor(t, { brokerUrl: broker.url, logger });
  await mesh.waitForModel('kws', 10_000);
  const inputs = sampleInputs('kws', 1);

  // A stream of requests, one every 25 ms, each with a 1 s deadline.
  const outcomes: { startedAt: number; endedAt: number; ok: boolean }[] = [];
  let streaming = true;
  const inFlight = new Set<Promise<void>>();
  const stream = (async () => {
    while (streaming) {
      const startedAt = performance.now();
      const p = mesh.infer('kws', inputs, { deadlineMs: 1_000 }).then(
        () => void outcomes.push({ startedAt, endedAt: performance.now(), ok: true }),
        () => void outcomes.push({ startedAt, endedAt: performance.now(), ok: false }),
      );
      inFlight.add(p);
      void p.finally(() => inFlight.delete(p));
      await new Promise((r) => setTimeout(r, 25));
    }
  })();
  await new Promise((r) => setTimeout(r, 500));

  await broker.stop();
  const downAt = performance.now();
  const down = await downBroker(broker.port);
  await new Promise((r) => setTimeout(r, 4_000));
  await down.close();
  // Both clients (agent and SDK) came back within a few hundred ms of losing the broker, and kept trying.
  const firstRetryMs = down.arrivals.length ? down.arrivals[0]! - downAt : Number.POSITIVE_INFINITY;
  assert.ok(firstRetryMs < 500, `first reconnect attempt ${firstRetryMs.toFixed(0)} ms after the broker went away`);
  assert.ok(down.arrivals.length >= 8, `only ${down.arrivals.length} reconnect attempts in 4 s from two clients`);
  // Backoff as scheduled: the first retry within 100 ms, none more than 1 s after the one before.
  assert.ok(delays.length >= 8, `reconnects scheduled: ${delays.join(' ')}`);
  assert.ok(Math.min(...delays) <= 100 && Math.max(...delays) <= 1_000, `reconnect delays ${delays.join(' ')} ms`);

  await broker.start();
  const backAt = performance.now();
  const until = Date.now() + 15_000;
  while (!outcomes.some((o) => o.ok && o.startedAt > backAt) && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
  await new Promise((r) => setTimeout(r, 1_000));
  streaming = false;
  await stream;
  await Promise.all(inFlight);

  // Outage after the broker is back: until the first request sent after that is answered, and none failed after it.
  const firstOk = outcomes.filter((o) => o.ok && o.startedAt > backAt).sort((a, b) => a.endedAt - b.endedAt)[0];
  assert.ok(firstOk, 'no request answered after the broker came back');
  const outageMs = firstOk.endedAt - backAt;
  const failedAfter = outcomes.filter((o) => !o.ok && o.startedAt > firstOk.endedAt).length;
  const failed = outcomes.filter((o) => !o.ok).length;
  t.diagnostic(
    `broker down ${(backAt - downAt).toFixed(0)} ms; outage after it was back ${outageMs.toFixed(0)} ms; ${failed} of ${outcomes.length} requests failed, ${failedAfter} after recovery; first retry ${firstRetryMs.toFixed(0)} ms`,
  );
  assert.equal(failedAfter, 0);
  assert.ok(outageMs <= 2_000, `outage ${outageMs.toFixed(0)} ms after the broker was back`);
});

test('brokers given as a list: a client whose broker dies fails over to the next one', async (t) => {
  const first = await restartableBroker(t);
  const second = await brokerFor(t);
  const dir = await kwsOnlyDir(t);
  const brokers = `${first.url},${second.url}`;
  const agent = await agentFor(t, { brokerUrl: brokers, modelsDir: dir });
  const mesh = await meshFor(t, { brokerUrl: [first.url, second.url].join(' , ') });
  await mesh.waitForModel('kws', 10_000);
  const inputs = sampleInputs('kws', 1);
  assert.equal((await mesh.infer('kws', inputs, { deadlineMs: 5_000 })).agentId, agent.id);

  await first.stop();
  const until = Date.now() + 15_000;
  let served: string | undefined;
  while (!served && Date.now() < until) {
    served = await mesh.infer('kws', inputs, { deadlineMs: 1_000 }).then(
      (r) => r.agentId,
      () => undefined,
    );
  }
  assert.equal(served, agent.id, 'no request served through the second broker');
  for (let i = 0; i < 10; i++) assert.equal((await mesh.infer('kws', inputs, { deadlineMs: 5_000 })).agentId, agent.id);
});

test('a broker list with a bad entry is refused as MESH_CONFIG', () => {
  assert.deepEqual(
    brokerList('mqtt://a:1883, mqtt://[::1]:1884,tcp://b').map((b) => [b.host, b.port]),
    [
      ['a', 1883],
      ['::1', 1884],
      ['b', 1883],
    ],
  );
  for (const bad of ['', ' , ', 'http://a:1883', 'mqtt://a:1883,nonsense', 'amqp://a:5672']) {
    assert.throws(
      () => brokerList(bad),
      (err: unknown) => err instanceof MeshError && err.code === 'MESH_CONFIG',
      bad,
    );
  }
});

test('closing a connection is bounded: acknowledged messages leave with a DISCONNECT, unacknowledged ones do not hold it', {
  timeout: 30_000,
}, async (t) => {
  const broker = await brokerFor(t);
  // What each connection through the relay sent last, in the order they connected.
  const lastSent: Buffer[][] = [];
  const relay = await tcpRelay(t, broker.port, {
    tap: () => {
      const sent: Buffer[] = [];
      lastSent.push(sent);
      return (chunk) => sent.push(chunk);
    },
  });
  const disconnected = (i: number) => {
    const last = lastSent[i]?.at(-1);
    return last !== undefined && last.length >= 2 && last[last.length - 2] === 0xe0 && last[last.length - 1] === 0x00;
  };
  const open = async (name: string) => {
    const c = openMeshConnection(relay.url, { clientId: name, backoff: { baseMs: 50, maxMs: 100 } });
    await c.firstConnect;
    return c;
  };
  const timedClose = async (c: ReturnType<typeof openMeshConnection>) => {
    const started = performance.now();
    await c.close();
    return performance.now() - started;
  };
  // A topic the broker takes from any client: its own status.
  const publish = (c: ReturnType<typeof openMeshConnection>, name: string) =>
    c.client.publish(topics.agentStatus(name), Buffer.from('data'), { qos: 1 });

  // Acknowledged: the close waits for the PUBACK, then ends with a DISCONNECT (so the broker drops any will).
  const acked = await open('acked');
  publish(acked, 'acked');
  const ackedMs = await timedClose(acked);
  assert.ok(ackedMs < 1_000, `closed in ${ackedMs.toFixed(0)} ms`);
  assert.ok(disconnected(0), 'the acknowledged client ended with a DISCONNECT');

  // The broker never acknowledges (its bytes are held): the close gives up after the grace and ends the socket.
  const held = await open('held');
  relay.hold();
  publish(held, 'held');
  const heldMs = await timedClose(held);
  assert.ok(heldMs >= CLOSE_GRACE_MS - 50 && heldMs < CLOSE_GRACE_MS + 1_500, `closed in ${heldMs.toFixed(0)} ms`);
  assert.ok(!disconnected(1), 'no DISCONNECT after the grace');
  relay.release();

  // The connection drops while a message waits for its acknowledgement: the close ends at once, where mqtt.js's own
  // graceful end waited for an acknowledgement that could no longer come.
  const dropped = await open('dropped');
  relay.hold();
  publish(dropped, 'dropped');
  const closing = timedClose(dropped);
  await new Promise((r) => setTimeout(r, 100));
  relay.drop();
  const droppedMs = await closing;
  assert.ok(droppedMs < 1_000, `closed ${droppedMs.toFixed(0)} ms after close() (the drop came 100 ms after it)`);
  relay.release();
});
