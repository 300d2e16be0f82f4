/**
 * The raw TCP floor under every MQTT number (docs/benchmarks.md, "overhead"): a ping-pong between two processes over
 * loopback with TCP_NODELAY, no MQTT, no CBOR. Used by the overhead benchmark.
 *
 *   node --import tsx bench/tcp-floor.ts server             prints {"event":"ready","port":P}; echoes every byte back
 *   node --import tsx bench/tcp-floor.ts client --port P --n 10000 --warmup 500 --bytes 64 [--hops 1]
 *        closed loop: writes `bytes`, waits for them all to come back, timed with hrtime;
 *        prints {"event":"result", p50_ms, p99_ms, ...}
 * No imports from the project: it measures the socket path alone.
 */
import net from 'node:net';
import { parseArgs } from 'node:util';

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: {
    port: { type: 'string' },
    n: { type: 'string', default: '10000' },
    warmup: { type: 'string', default: '500' },
    bytes: { type: 'string', default: '64' },
  },
});

const summarize = (xs: Float64Array) => {
  const s = Float64Array.from(xs).sort();
  const at = (p: number) => s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
  const r = (v: number) => Math.round(v * 10_000) / 10_000;
  return { p50_ms: r(at(50)), p90_ms: r(at(90)), p99_ms: r(at(99)), max_ms: r(s[s.length - 1]!) };
};

if (positionals[0] === 'server') {
  const server = net.createServer({ noDelay: true }, (socket) => socket.pipe(socket));
  server.listen(0, '127.0.0.1', () => {
    process.stdout.write(`${JSON.stringify({ event: 'ready', port: (server.address() as net.AddressInfo).port })}\n`);
  });
  process.on('SIGTERM', () => process.exit(0));
} else {
  const n = Number(values.n);
  const warmup = Number(values.warmup);
  const bytes = Number(values.bytes);
  const payload = Buffer.alloc(bytes, 7);
  const socket = net.connect({ port: Number(values.port), host: '127.0.0.1', noDelay: true });
  await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
  let pending = 0;
  let wake: () => void = () => {};
  socket.on('data', (chunk: Buffer) => {
    pending -= chunk.length;
    if (pending <= 0) wake();
  });
  const once = () =>
    new Promise<void>((resolve) => {
      pending = bytes;
      wake = resolve;
      socket.write(payload);
    });
  for (let i = 0; i < warmup; i++) await once();
  const samples = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    await once();
    samples[i] = Number(process.hrtime.bigint() - t0) / 1e6;
  }
  process.stdout.write(`${JSON.stringify({ event: 'result', n, bytes, ...summarize(samples) })}\n`);
  socket.destroy();
  process.exit(0);
}
