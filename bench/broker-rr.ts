/**
 * One side of the broker comparison (bench/brokers.ts, docs/benchmarks.md "brokers"): QoS 1 request/reply between two
 * processes through a broker, on the mesh's own topics and with the mesh's client layer (@edge-mesh/client:
 * TCP_NODELAY, CONNECT token or password), so every engine carries exactly what the mesh sends it.
 *
 *   node --import tsx bench/broker-rr.ts responder --broker URL --key FILE [--password-file F]
 *        subscribes to its request topics and answers each request with its payload; prints {"event":"ready"}
 *   node --import tsx bench/broker-rr.ts requester --broker URL --key FILE [--password-file F] --peer AGENT_ID
 *        --warmup W --n N --concurrency C --duration-ms D [--subscription-qos 0|1] [--publish-qos 0|1]
 *        N sequential round trips (p50_ms, p99_ms), then C outstanding for D ms (rps); prints {"event":"result", ...}
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { loadKeyFile, openMeshConnection } from '@edge-mesh/client';
import { topics } from '@edge-mesh/protocol';

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: {
    broker: { type: 'string' },
    key: { type: 'string' },
    'password-file': { type: 'string' },
    'subscription-qos': { type: 'string' },
    'publish-qos': { type: 'string' },
    peer: { type: 'string' },
    warmup: { type: 'string', default: '300' },
    n: { type: 'string', default: '3000' },
    concurrency: { type: 'string', default: '16' },
    'duration-ms': { type: 'string', default: '3000' },
  },
});

const identity = await loadKeyFile(values.key!);
const password = values['password-file'] ? readFileSync(values['password-file'], 'utf8').trim() : undefined;
const connection = openMeshConnection(values.broker!, {
  identity,
  ...(password !== undefined ? { username: identity.id, password } : {}),
  connectTimeoutMs: 10_000,
});
await connection.firstConnect;
const client = connection.client;
/** 0 on NATS, as the mesh publishes there (docs/operations.md, "Running on a NATS cluster"). */
const publishQos = values['publish-qos'] === '0' ? 0 : 1;
const emit = (event: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(event)}\n`);
process.on('SIGTERM', () => process.exit(0));
/** A clustered broker refuses a QoS 1 subscription until it can hold it (NATS: until JetStream has its leaders). */
async function subscribe(filter: string): Promise<void> {
  const until = Date.now() + 30_000;
  for (;;) {
    try {
      await client.subscribeAsync(filter, { qos: values['subscription-qos'] === '0' ? 0 : 1 });
      return;
    } catch (err) {
      if (Date.now() > until) throw err;
      await new Promise((r) => setTimeout(r, 250));
    }
  }
}

if (positionals[0] === 'responder') {
  const prefix = `mesh/v1/agent/${identity.id}/req/`;
  client.on('message', (topic, payload) => {
    if (!topic.startsWith(prefix)) return;
    client.publish(topics.clientReply(topic.slice(prefix.length), identity.id), payload, { qos: publishQos });
  });
  await subscribe(topics.agentRequestsFor(identity.id));
  emit({ event: 'ready' });
} else {
  const peer = values.peer!;
  const requestTopic = topics.agentRequest(peer, identity.id);
  const waiting = new Map<number, () => void>();
  client.on('message', (_topic, payload) => {
    if (payload.byteLength < 4) return;
    const seq = payload.readUInt32BE(0);
    const done = waiting.get(seq);
    waiting.delete(seq);
    done?.();
  });
  await subscribe(topics.clientRepliesFor(identity.id));
  let next = 0;
  const payload = Buffer.alloc(64, 7);
  // At QoS 0 a message can be lost: a round trip with no answer after 5 s is counted and given up.
  let lost = 0;
  const once = () =>
    new Promise<void>((resolve) => {
      const seq = next++;
      const body = Buffer.from(payload);
      body.writeUInt32BE(seq, 0);
      const timer = setTimeout(() => {
        if (!waiting.delete(seq)) return;
        lost++;
        resolve();
      }, 5_000);
      waiting.set(seq, () => {
        clearTimeout(timer);
        resolve();
      });
      client.publish(requestTopic, body, { qos: publishQos });
    });
  // The responder may not have its subscription everywhere yet: retry the first request until one comes back.
  for (;;) {
    const ok = await Promise.race([once().then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 1_000))]);
    if (ok) break;
  }
  for (let i = 0; i < Number(values.warmup); i++) await once();
  const n = Number(values.n);
  const samples = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    await once();
    samples[i] = Number(process.hrtime.bigint() - t0) / 1e6;
  }
  samples.sort();
  const at = (p: number) => samples[Math.min(n - 1, Math.max(0, Math.ceil((p / 100) * n) - 1))]!;
  const r4 = (v: number) => Math.round(v * 10_000) / 10_000;
  // Throughput: `concurrency` requests outstanding, each completion sends the next, for duration-ms.
  const concurrency = Number(values.concurrency);
  const durationMs = Number(values['duration-ms']);
  let completed = 0;
  let stop = false;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (!stop) {
        await once();
        completed++;
        if (performance.now() - started >= durationMs) stop = true;
      }
    }),
  );
  const elapsedS = (performance.now() - started) / 1000;
  emit({
    event: 'result',
    n,
    p50_ms: r4(at(50)),
    p90_ms: r4(at(90)),
    p99_ms: r4(at(99)),
    concurrency,
    rps: Math.round(completed / elapsedS),
    qos: publishQos,
    lost,
  });
}
