/**
 * `npm run bench -- brokers [--quick]` (docs/benchmarks.md, "brokers"): the same QoS 1 request/reply load through each
 * MQTT engine the mesh runs on, with the mesh's own authentication on each: the embedded aedes broker
 * (`edge-mesh broker`, CONNECT tokens and its ACLs) and mosquitto 2.0 (password and ACL files written by
 * `edge-mesh auth mosquitto`'s code, broker/src/mosquitto.ts). Two client processes (bench/broker-rr.ts): a responder
 * on an agent's request topic and a requester on an app's reply topic; N sequential round trips give p50_ms and
 * p99_ms, then `concurrency` outstanding requests for a fixed time give rps.
 *
 * NATS 2.9 runs as a 3-node cluster with JetStream and MQTT (users from `edge-mesh auth nats`'s code, broker/src/nats.ts),
 * the responder and the requester on different nodes, with QoS 0 subscriptions and publishes, as `--engine nats` runs
 * the mesh there (`--with-nats-qos1` adds a run at QoS 1). Each engine's `qos` is the QoS of its requests and replies.
 * RabbitMQ 3.10 (Debian's rabbitmq-server) runs as a 3-node cluster with the MQTT plugin and
 * rabbitmq_auth_backend_http pointed at the mesh's auth service (`edge-mesh auth rabbitmq`, broker/src/rabbitmq.ts),
 * started in this process: `rabbitmq` has both clients on one node, `rabbitmq_cross_node` the requester on another
 * node than the responder (every message crosses the cluster link).
 *
 * With `--devices N`, each cluster is measured once more (the cross-node pair) while N idle device connections, spread
 * round its three nodes by bench/device-swarm.ts, stay connected: `NAME.with_devices` has the same figures and how
 * the devices fared (connected, failed, connect_ms, dropped).
 *
 * An engine that is not installed (or has no auth wiring yet) is skipped with the reason: last line
 * `{ engines: { NAME: { p50_ms, p99_ms, rps } }, skipped: { NAME: reason } }`.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { rabbitmqAuthConf, startRabbitmqAuth, writeMosquittoAuth, writeNatsAuth } from '@edge-mesh/broker';
import { freePort, installedCommand, type RabbitmqCluster, rabbitmqServerCommand, startRabbitmqCluster } from '@edge-mesh/demo';
import { admit, generateIdentity } from '@edge-mesh/protocol';
import {
  admitted,
  assertBuilt,
  type BenchContext,
  type BenchResult,
  benchTempDir,
  environment,
  isEvent,
  type Proc,
  parseJson,
  ROOT,
  sleep,
  spawnProc,
  startBrokerProc,
  unadmitted,
} from './lib.ts';

interface Load {
  warmup: number;
  n: number;
  concurrency: number;
  durationMs: number;
  /** Idle device connections to hold across a cluster's nodes for a second measurement (0: none). */
  devices: number;
}

/** How bench/device-swarm.ts authenticates its devices: a key file each (CONNECT tokens), or one shared password. */
type SwarmAuth = { keysFile: string } | { username: string; passwordFile: string };

/**
 * Connects `load.devices` idle devices round `urls` (bench/device-swarm.ts), runs `measureAgain` while they stay, and
 * returns its figures with what the devices saw.
 */
async function withDevices(
  name: string,
  urls: string[],
  auth: SwarmAuth,
  load: Load,
  log: (l: string) => void,
  measureAgain: () => Promise<Record<string, unknown>>,
): Promise<Record<string, unknown>> {
  const swarm = spawnProc(
    `${name} devices`,
    [
      '--import',
      'tsx',
      path.join(ROOT, 'bench', 'device-swarm.ts'),
      '--brokers',
      urls.join(','),
      '--n',
      String(load.devices),
      ...('keysFile' in auth ? ['--keys', auth.keysFile] : ['--username', auth.username, '--password-file', auth.passwordFile]),
    ],
    { stdin: true },
  );
  try {
    const up = parseJson(await swarm.waitLine('stdout', isEvent('connected'), 600_000, 'connected event'))!;
    log(`${name}: ${up.connected} of ${load.devices} devices connected in ${up.connect_ms} ms (${JSON.stringify(up.errors)})`);
    const figures = await measureAgain();
    // The swarm lets its devices go when its stdin closes.
    swarm.child.stdin?.end();
    const end = parseJson(await swarm.waitLine('stdout', isEvent('result'), 30_000, 'result'))!;
    return {
      ...figures,
      devices: load.devices,
      connected: up.connected,
      failed: up.failed,
      connect_ms: up.connect_ms,
      connect_errors: up.errors,
      dropped: end.dropped,
    };
  } finally {
    await swarm.stop(10_000);
  }
}

async function waitForPort(port: number, proc: Proc, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    if (proc.hasExited()) throw new Error(`${proc.name} exited: ${proc.lines.stderr.slice(-10).join('\n')}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > until) throw new Error(`${proc.name} did not listen on ${port}`);
    await sleep(50);
  }
}

interface Side {
  keyFile: string;
  id: string;
  passwordFile?: string;
  /** 0 on NATS, as the mesh runs there (docs/operations.md, "Running on a NATS cluster"). */
  subscriptionQos?: 0 | 1;
  /** The QoS of requests and replies; 0 on NATS with QoS 0 subscriptions, as `--engine nats` gives the mesh. */
  publishQos?: 0 | 1;
}

/** Runs the responder and the requester against `url` and returns the requester's figures. */
function measure(name: string, url: string, agent: Side, app: Side, load: Load, log: (l: string) => void, responderUrl = url) {
  return measureSplit(name, responderUrl, url, agent, app, load, log);
}

/** The same with the responder on `agentUrl` and the requester on `appUrl` (two nodes of one cluster). */
async function measureSplit(name: string, agentUrl: string, appUrl: string, agent: Side, app: Side, load: Load, log: (l: string) => void) {
  const rr = path.join(ROOT, 'bench', 'broker-rr.ts');
  const creds = (s: Side) => [
    '--broker',
    s === agent ? agentUrl : appUrl,
    '--key',
    s.keyFile,
    ...(s.passwordFile ? ['--password-file', s.passwordFile] : []),
    ...(s.subscriptionQos !== undefined ? ['--subscription-qos', String(s.subscriptionQos)] : []),
    ...(s.publishQos !== undefined ? ['--publish-qos', String(s.publishQos)] : []),
  ];
  const responder = spawnProc(`${name} responder`, ['--import', 'tsx', rr, 'responder', ...creds(agent)]);
  await responder.waitLine('stdout', isEvent('ready'), 20_000, 'ready event');
  const requester = spawnProc(`${name} requester`, [
    '--import',
    'tsx',
    rr,
    'requester',
    ...creds(app),
    '--peer',
    agent.id,
    '--warmup',
    String(load.warmup),
    '--n',
    String(load.n),
    '--concurrency',
    String(load.concurrency),
    '--duration-ms',
    String(load.durationMs),
  ]);
  const line = await requester.waitLine('stdout', isEvent('result'), 60_000 + load.durationMs, 'result');
  await requester.stop();
  await responder.stop();
  const r = parseJson(line)!;
  log(`${name}: p50 ${r.p50_ms} ms, p99 ${r.p99_ms} ms, ${r.rps} req/s at ${r.concurrency} outstanding`);
  return { p50_ms: r.p50_ms, p90_ms: r.p90_ms, p99_ms: r.p99_ms, rps: r.rps, n: r.n, concurrency: r.concurrency, qos: r.qos, lost: r.lost };
}

async function aedesEngine(load: Load, log: (l: string) => void) {
  const { proc, url } = await startBrokerProc('aedes');
  const agent = await admitted(url, 'agent');
  const app = await admitted(url, 'app');
  try {
    return await measure(
      'aedes',
      url,
      { keyFile: agent.keyFile, id: agent.identity.id },
      { keyFile: app.keyFile, id: app.identity.id },
      load,
      log,
    );
  } finally {
    await proc.stop();
  }
}

async function mosquittoEngine(bin: string, load: Load, log: (l: string) => void, nodelay = true) {
  const agent = unadmitted('agent');
  const app = unadmitted('app');
  const dir = benchTempDir('mosquitto');
  const port = await freePort();
  const files = await writeMosquittoAuth(
    dir,
    [
      { id: agent.identity.id, role: 'agent' },
      { id: app.identity.id, role: 'app' },
    ],
    { port, host: '127.0.0.1' },
  );
  // As root mosquitto drops to the `mosquitto` user, which could not read the 0700 folder: stay root here.
  const conf = `${files.confFile}.bench`;
  let text = readFileSync(files.confFile, 'utf8') + (process.getuid?.() === 0 ? 'user root\n' : '');
  if (!nodelay) text = text.replace('set_tcp_nodelay true', 'set_tcp_nodelay false');
  writeFileSync(conf, text);
  const proc = spawnProc('mosquitto', ['-c', conf], { command: bin });
  try {
    await waitForPort(port, proc, 10_000);
    const version = /mosquitto version (\S+)/.exec(proc.lines.stderr.join('\n'))?.[1] ?? 'unknown';
    const figures = await measure(
      nodelay ? 'mosquitto' : 'mosquitto without set_tcp_nodelay',
      `mqtt://127.0.0.1:${port}`,
      { keyFile: agent.keyFile, id: agent.identity.id, passwordFile: files.secrets.get(agent.identity.id)! },
      { keyFile: app.keyFile, id: app.identity.id, passwordFile: files.secrets.get(app.identity.id)! },
      load,
      log,
    );
    return { ...figures, version };
  } finally {
    await proc.stop();
  }
}

/**
 * NATS 2.9 as the mesh runs it (docs/operations.md, "Running on a NATS cluster"): three nodes with JetStream and MQTT,
 * stream replicas 3, users written by `edge-mesh auth nats`'s code (broker/src/nats.ts). The responder is on node 1
 * and the requester on node 2, so every round trip crosses the cluster, as it does when devices spread over nodes.
 */
async function natsEngine(bin: string, load: Load, log: (l: string) => void, subscriptionQos: 0 | 1 = 0) {
  const agent = unadmitted('agent');
  const app = unadmitted('app');
  const dir = benchTempDir('nats');
  const nodes = [];
  const taken = new Set<number>();
  const port = async () => {
    for (;;) {
      const p = await freePort();
      if (!taken.has(p)) {
        taken.add(p);
        return p;
      }
    }
  };
  for (let i = 1; i <= 3; i++)
    nodes.push({ name: `mesh-${i}`, host: '127.0.0.1', mqttPort: await port(), clientPort: await port(), clusterPort: await port() });
  const files = await writeNatsAuth(
    dir,
    [
      { id: agent.identity.id, role: 'agent' },
      { id: app.identity.id, role: 'app' },
    ],
    { nodes },
  );
  const procs = files.nodeConfs.map((n) => spawnProc(n.name, ['-c', n.conf], { command: bin }));
  try {
    for (const [i, n] of nodes.entries()) await waitForPort(n.mqttPort, procs[i]!, 20_000);
    // JetStream elects its leaders after the routes are up; bench/broker-rr.ts retries its subscription until then.
    const version = /Version:\s+(\S+)/.exec(procs[0]!.lines.stderr.join('\n'))?.[1] ?? 'unknown';
    const side = (k: typeof agent): Side => ({
      keyFile: k.keyFile,
      id: k.identity.id,
      passwordFile: files.secrets.get(k.identity.id)!,
      subscriptionQos,
      publishQos: subscriptionQos,
    });
    // The responder on node 1, the requester on node 2.
    const run = (name: string) =>
      measure(name, files.nodeConfs[1]!.mqttUrl, side(agent), side(app), load, log, files.nodeConfs[0]!.mqttUrl);
    const figures = await run(subscriptionQos === 0 ? 'nats' : 'nats with QoS 1 subscriptions');
    const result: Record<string, unknown> = {
      ...figures,
      version,
      nodes: 3,
      stream_replicas: 3,
      subscription_qos: subscriptionQos,
      publish_qos: subscriptionQos,
      responder_node: 1,
      requester_node: 2,
    };
    if (load.devices > 0 && subscriptionQos === 0) {
      // Every device with the app's user and a client id of its own: NATS ties permissions to the user, not the client id.
      result.with_devices = await withDevices(
        'nats',
        files.nodeConfs.map((c) => c.mqttUrl),
        { username: app.identity.id, passwordFile: files.secrets.get(app.identity.id)! },
        load,
        log,
        () => run('nats with devices'),
      );
    }
    return result;
  } finally {
    await Promise.all(procs.map((p) => p.stop()));
  }
}

/** A 3-node RabbitMQ cluster with the mesh's auth service; both clients on node 1, then the requester on node 2. */
async function rabbitmqEngines(load: Load, log: (l: string) => void) {
  const operator = generateIdentity('operator');
  const agent = unadmitted('agent');
  const app = unadmitted('app');
  const dir = benchTempDir('rabbitmq');
  let cluster: RabbitmqCluster | undefined;
  let auth: Awaited<ReturnType<typeof startRabbitmqAuth>> | undefined;
  const started = Date.now();
  try {
    // Ports are picked free but may be taken before a node binds them: try again with new ones.
    for (let attempt = 1; !cluster; attempt++) {
      const ports = new Set<number>();
      while (ports.size < 3) ports.add(await freePort());
      auth = await startRabbitmqAuth({
        trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }],
        dataDir: path.join(dir, `admissions-${attempt}`),
        brokerUrls: [...ports].map((p) => `mqtt://127.0.0.1:${p}`),
      });
      try {
        cluster = await startRabbitmqCluster({
          dir: path.join(dir, `cluster-${attempt}`),
          conf: rabbitmqAuthConf(auth.url),
          mqttPorts: [...ports],
        });
      } catch (err) {
        await auth.close();
        auth = undefined;
        if (attempt === 3) throw err;
        log(`rabbitmq: cluster start failed, trying again: ${(err as Error).message}`);
      }
    }
    log(`rabbitmq: 3 nodes up and joined in ${Date.now() - started} ms`);
    for (const k of [agent, app]) await auth!.admit(admit(operator, k.identity));
    const version = (await cluster.ctl(cluster.nodes[0]!, ['version'])).trim();
    const [n1, n2] = cluster.urls as [string, string];
    const side = (k: typeof agent) => ({ keyFile: k.keyFile, id: k.identity.id });
    const same = await measure('rabbitmq', n1, side(agent), side(app), load, log);
    const cross: Record<string, unknown> = await measureSplit('rabbitmq_cross_node', n1, n2, side(agent), side(app), load, log);
    if (load.devices > 0) {
      // The auth service ties a client id to its identity: every device has its own admitted key.
      const keys = Array.from({ length: load.devices }, () => unadmitted('app'));
      for (const k of keys) await auth!.admit(admit(operator, k.identity));
      const keysFile = path.join(dir, 'device-keys.txt');
      writeFileSync(keysFile, keys.map((k) => k.keyFile).join('\n'));
      cross.with_devices = await withDevices('rabbitmq', cluster.urls, { keysFile }, load, log, () =>
        measureSplit('rabbitmq_cross_node with devices', n1, n2, side(agent), side(app), load, log),
      );
    }
    return { rabbitmq: { ...same, version, nodes: 3 }, rabbitmq_cross_node: { ...cross, version, nodes: 3 } };
  } finally {
    await auth?.close();
    await cluster?.close();
  }
}

export async function run(ctx: BenchContext): Promise<BenchResult> {
  assertBuilt(['protocol', 'client', 'broker', 'cli']);
  const num = (key: string, quick: number, full: number) => {
    const v = ctx.args[key];
    return typeof v === 'string' ? Number(v) : ctx.quick ? quick : full;
  };
  const load: Load = {
    warmup: num('warmup', 200, 1_000),
    n: num('n', 2_000, 20_000),
    concurrency: num('concurrency', 16, 16),
    durationMs: num('duration-ms', 2_000, 10_000),
    devices: num('devices', 0, 0),
  };
  const engines: Record<string, unknown> = {};
  const skipped: Record<string, string> = {};
  ctx.log(
    `brokers: ${load.n} sequential round trips per engine (QoS 1; NATS QoS 0), then ${load.concurrency} outstanding for ${load.durationMs} ms`,
  );

  const only = typeof ctx.args.engines === 'string' ? new Set(ctx.args.engines.split(',')) : undefined;
  const wanted = (name: string) => !only || only.has(name);
  if (wanted('aedes')) engines.aedes = await aedesEngine(load, ctx.log);
  if (wanted('mosquitto')) {
    const mosquitto = installedCommand('mosquitto');
    if (mosquitto) {
      engines.mosquitto = await mosquittoEngine(mosquitto, load, ctx.log);
      // The delayed-ACK trap (docs/operations.md): each round trip waits tens of ms, so only a few are measured.
      if (ctx.args['with-delayed-ack'] === true)
        engines.mosquitto_no_nodelay = await mosquittoEngine(
          mosquitto,
          { warmup: 5, n: Math.min(load.n, 100), concurrency: load.concurrency, durationMs: 2_000, devices: 0 },
          ctx.log,
          false,
        );
    } else skipped.mosquitto = 'mosquitto is not installed (Debian package `mosquitto`)';
  }
  if (wanted('rabbitmq')) {
    if (rabbitmqServerCommand()) Object.assign(engines, await rabbitmqEngines(load, ctx.log));
    else skipped.rabbitmq = 'rabbitmq-server is not installed (Debian package `rabbitmq-server`)';
  }
  if (wanted('nats')) {
    const nats = installedCommand('nats-server');
    if (nats) {
      engines.nats = await natsEngine(nats, load, ctx.log);
      // What QoS 1 subscriptions (a JetStream consumer each) cost there.
      if (ctx.args['with-nats-qos1'] === true) engines.nats_qos1_subscriptions = await natsEngine(nats, load, ctx.log, 1);
    } else skipped.nats = 'nats-server is not installed (Debian package `nats-server`)';
  }

  return {
    bench: 'brokers',
    quick: ctx.quick,
    payload_bytes: 64,
    ...load,
    environment: environment(),
    engines,
    skipped,
  };
}
