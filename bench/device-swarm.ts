/**
 * Device connections for the broker comparison (bench/brokers.ts, `--devices N`): N MQTT clients that connect, stay
 * connected and say nothing, as a fleet of idle devices does, spread round the broker URLs given.
 *
 *   node --import tsx bench/device-swarm.ts --brokers URL,URL,URL --n 5000 [--batch 100] [--keepalive-s 60]
 *        (--keys FILE: one key file path per line, one per device, each connecting with its CONNECT token, or
 *         --username NAME --password-file FILE: every device with the same password and its own client id)
 *
 * Each client uses the mesh's connection recipe (@edge-mesh/client: MQTT 3.1.1, clean session, TCP_NODELAY) and
 * keeps the connection alive with PINGREQs at its keepalive. They connect `batch` at a time; then one line
 * {"event":"connected","connected":C,"failed":F,"connect_ms":T,"errors":{...}} on stdout. They stay until stdin
 * closes or SIGTERM, then {"event":"result","connected":C,"dropped":D} (D: connections the broker closed meanwhile).
 */
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { type MeshConnection, openMeshConnection } from '@edge-mesh/client';
import { parseKeyFile } from '@edge-mesh/protocol';

const { values } = parseArgs({
  options: {
    brokers: { type: 'string' },
    n: { type: 'string', default: '5000' },
    batch: { type: 'string', default: '100' },
    'keepalive-s': { type: 'string', default: '60' },
    keys: { type: 'string' },
    username: { type: 'string' },
    'password-file': { type: 'string' },
    'timeout-ms': { type: 'string', default: '20000' },
  },
});
const urls = (values.brokers ?? '').split(',').filter(Boolean);
const n = Number(values.n);
const batch = Number(values.batch);
if (urls.length === 0 || !(n > 0) || (!values.keys && !values.username)) {
  process.stderr.write('usage: device-swarm.ts --brokers URL[,URL…] --n N (--keys FILE | --username NAME --password-file FILE)\n');
  process.exit(2);
}
const keyFiles = values.keys ? readFileSync(values.keys, 'utf8').split('\n').filter(Boolean) : [];
if (values.keys && keyFiles.length < n) {
  process.stderr.write(`device-swarm: ${keyFiles.length} key files for ${n} devices\n`);
  process.exit(2);
}
const password = values['password-file'] ? readFileSync(values['password-file'], 'utf8').trim() : undefined;
const run = Math.random().toString(36).slice(2, 8);

const connections: MeshConnection[] = [];
const errors: Record<string, number> = {};
let connected = 0;
let dropped = 0;
const started = performance.now();

function open(i: number): Promise<void> {
  const url = urls[i % urls.length]!;
  const device = values.keys
    ? { identity: parseKeyFile(readFileSync(keyFiles[i]!, 'utf8'), keyFiles[i]) }
    : { clientId: `swarm-${run}-${i}`, username: values.username!, password: password! };
  const conn = openMeshConnection(url, {
    ...device,
    keepaliveS: Number(values['keepalive-s']),
    connectTimeoutMs: Number(values['timeout-ms']),
    // A device that loses its connection is counted, not reconnected: the figures are about what the broker keeps.
    backoff: { baseMs: 3_600_000, maxMs: 3_600_000 },
    numberCache: false,
    onRefused: (err) => {
      errors[err.code] = (errors[err.code] ?? 0) + 1;
    },
  });
  connections.push(conn);
  return new Promise<void>((resolve) => {
    const timer = setTimeout(() => {
      errors.timeout = (errors.timeout ?? 0) + 1;
      resolve();
    }, Number(values['timeout-ms']));
    void conn.firstConnect.then(() => {
      clearTimeout(timer);
      connected++;
      conn.client.once('close', () => dropped++);
      resolve();
    });
  });
}

for (let i = 0; i < n; i += batch) {
  await Promise.all(Array.from({ length: Math.min(batch, n - i) }, (_, j) => open(i + j)));
}
process.stdout.write(
  `${JSON.stringify({ event: 'connected', connected, failed: n - connected, connect_ms: Math.round(performance.now() - started), errors })}\n`,
);

let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  process.stdout.write(`${JSON.stringify({ event: 'result', connected, dropped })}\n`);
  await Promise.race([Promise.all(connections.map((c) => c.close())), new Promise((r) => setTimeout(r, 5_000))]);
  process.exit(0);
};
createInterface({ input: process.stdin }).on('close', () => void stop());
process.on('SIGTERM', () => void stop());
