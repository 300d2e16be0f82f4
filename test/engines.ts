/**
 * The external MQTT engines the tests run the mesh on (docs/operations.md, "Running the end-to-end suite on an
 * engine"): mosquitto 2.0 with the files `edge-mesh auth mosquitto` writes, a 3-node RabbitMQ 3.10 cluster behind
 * `edge-mesh auth rabbitmq`'s HTTP auth service, a 3-node NATS 2.9 cluster with the users `edge-mesh auth nats`
 * writes. test/mosquitto.test.ts, test/rabbitmq.test.ts and test/nats.test.ts start their engines with the functions
 * here; with `MESH_TEST_ENGINE=mosquitto|rabbitmq|nats`, the end-to-end suite (test/mesh.test.ts,
 * test/payments-mesh.test.ts) runs on one such engine started once per test file, each identity it uses admitted
 * there before it connects (test/helpers.ts). Without the variable, or with `aedes`, it runs on the embedded broker.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after } from 'node:test';
import {
  type MosquittoIdentity,
  type NatsNode,
  type RabbitmqAuthHandle,
  rabbitmqAuthConf,
  reloadNatsNodes,
  startRabbitmqAuth,
  writeMosquittoAuth,
  writeNatsAuth,
} from '@edge-mesh/broker';
import { freePort, installedCommand, type RabbitmqCluster, rabbitmqServerCommand, startRabbitmqCluster } from '@edge-mesh/demo';
import { admit, generateIdentity, type Identity, MeshError, topics } from '@edge-mesh/protocol';
import mqtt from 'mqtt';
import type { Logger } from 'pino';

export type EngineName = 'aedes' | 'mosquitto' | 'rabbitmq' | 'nats';
const ENGINES: readonly EngineName[] = ['aedes', 'mosquitto', 'rabbitmq', 'nats'];

/** The engine of this test process: `MESH_TEST_ENGINE`, default the embedded aedes broker. */
export const ENGINE: EngineName = (() => {
  const name = process.env.MESH_TEST_ENGINE?.trim() || 'aedes';
  if (!(ENGINES as readonly string[]).includes(name))
    throw new MeshError('MESH_CONFIG', `MESH_TEST_ENGINE=${JSON.stringify(name)}: use one of ${ENGINES.join(', ')}`);
  return name as EngineName;
})();

export const MOSQUITTO = installedCommand('mosquitto');
export const NATS = installedCommand('nats-server');

/** Why an engine cannot run here (its binary is missing), or false. */
export function engineMissing(name: EngineName): string | false {
  switch (name) {
    case 'aedes':
      return false;
    case 'mosquitto':
      return MOSQUITTO ? false : 'mosquitto is not installed (Debian package `mosquitto`; .ci/run installs it)';
    case 'rabbitmq':
      return rabbitmqServerCommand() ? false : 'rabbitmq-server is not installed (Debian package `rabbitmq-server`; .ci/run installs it)';
    case 'nats':
      return NATS ? false : 'nats-server is not installed (Debian package `nats-server`; .ci/run installs it)';
  }
}

/** For `describe(…, { skip })` in the end-to-end suite: set when MESH_TEST_ENGINE names an engine not installed here. */
export const ENGINE_SKIP: string | false = (() => {
  const missing = engineMissing(ENGINE);
  return missing ? `MESH_TEST_ENGINE=${ENGINE}: ${missing}` : false;
})();

/** True when `port` on `host` takes TCP connections. */
export function listening(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(port, host, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A server process started here: its log so far, and a stop that waits for its exit. */
export interface ServerProcess {
  readonly child: ChildProcess;
  log(): string;
  /** SIGTERM (or `signal`), resolved once it exited. */
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/** Servers started here and not stopped yet: a test process that ends any way at all takes them with it. */
const live = new Set<ChildProcess>();
process.once('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

function serverProcess(command: string, args: string[]): ServerProcess {
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  live.add(child);
  let log = '';
  child.stderr!.on('data', (c: Buffer) => (log += c.toString()));
  const exited = new Promise<void>((r) =>
    child.once('exit', () => {
      live.delete(child);
      r();
    }),
  );
  return {
    child,
    log: () => log,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// mosquitto

/**
 * Starts mosquitto with a configuration `edge-mesh auth mosquitto` wrote (a copy with `extra` lines appended beside
 * it); resolves once its port takes connections.
 */
export async function startMosquitto(confFile: string, port: number, extra: string[] = []): Promise<ServerProcess> {
  if (!MOSQUITTO) throw new MeshError('MESH_CONFIG', engineMissing('mosquitto') as string);
  let conf = await readFile(confFile, 'utf8');
  // Run as root (CI containers), mosquitto drops to the `mosquitto` user and could not read the 0700 folder.
  if (process.getuid?.() === 0) conf += 'user root\n';
  for (const line of extra) conf += `${line}\n`;
  const testConf = `${confFile}.test`;
  await writeFile(testConf, conf);
  const server = serverProcess(MOSQUITTO, ['-c', testConf]);
  const until = Date.now() + 10_000;
  for (;;) {
    if (server.child.exitCode !== null) throw new MeshError('MESH_CONFIG', `mosquitto exited: ${server.log()}`);
    if (await listening('127.0.0.1', port)) return server;
    if (Date.now() > until) {
      await server.stop('SIGKILL');
      throw new MeshError('MESH_CONFIG', `mosquitto did not listen on ${port}: ${server.log()}`);
    }
    await sleep(50);
  }
}

// ---------------------------------------------------------------------------------------------
// NATS

export interface NatsNodeProc extends ServerProcess {
  name: string;
  url: string;
  conf: string;
}

/** Starts one nats-server per configuration and waits until each MQTT port takes connections. */
export async function startNatsNodes(nodes: readonly { name: string; conf: string; mqttUrl: string }[]): Promise<NatsNodeProc[]> {
  const procs = nodes.map((n) => startNatsNode(n));
  for (const p of procs) await natsNodeListening(p);
  return procs;
}

function startNatsNode(n: { name: string; conf: string; mqttUrl: string }): NatsNodeProc {
  if (!NATS) throw new MeshError('MESH_CONFIG', engineMissing('nats') as string);
  const server = serverProcess(NATS, ['-c', n.conf, ...(process.env.NATS_TEST_DEBUG ? ['-D'] : [])]);
  return { ...server, name: n.name, url: n.mqttUrl, conf: n.conf };
}

async function natsNodeListening(p: NatsNodeProc): Promise<void> {
  const u = new URL(p.url);
  const until = Date.now() + 20_000;
  while (!(await listening(u.hostname, Number(u.port)))) {
    if (p.child.exitCode !== null) throw new MeshError('MESH_CONFIG', `${p.name} exited: ${p.log()}`);
    if (Date.now() > until) throw new MeshError('MESH_CONFIG', `${p.name} did not listen on ${p.url}: ${p.log()}`);
    await sleep(50);
  }
}

/** Three loopback addresses, one node on each, and `edge-mesh auth nats` arguments for ports free there. */
export async function natsClusterPorts(): Promise<{ nodes: NatsNode[]; args: string[] }> {
  const hosts = ['127.0.0.1', '127.0.0.2', '127.0.0.3'];
  const ports: number[] = [];
  while (ports.length < 3) {
    const p = await freePort();
    if (ports.includes(p)) continue;
    let free = true;
    for (const h of hosts.slice(1)) free &&= !(await listening(h, p));
    if (free) ports.push(p);
  }
  const [mqttPort, clientPort, clusterPort] = ports as [number, number, number];
  return {
    nodes: hosts.map((host, i) => ({ name: `mesh-${i + 1}`, host, mqttPort, clientPort, clusterPort })),
    args: [
      ...hosts.flatMap((h) => ['--node-host', h]),
      '--mqtt-port',
      String(mqttPort),
      '--client-port',
      String(clientPort),
      '--cluster-port',
      String(clusterPort),
    ],
  };
}

/**
 * A one-shot client that checks `username` can connect: a client id of its own, since NATS holds a session's client id
 * for a moment after the connection closed and the identity's own client connects right after the probe.
 */
function probeClient(url: string, username: string, password: string): mqtt.MqttClient {
  return mqtt.connect(url, {
    username,
    password,
    clientId: `${username}-probe`,
    reconnectPeriod: 0,
    protocolVersion: 4,
    connectTimeout: 3_000,
  });
}

/** Waits until an admitted client can connect to every node and hold a QoS 1 subscription (JetStream is up). */
export async function natsClusterReady(urls: readonly string[], username: string, password: string, timeoutMs = 30_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (const url of urls) {
    for (;;) {
      const c = probeClient(url, username, password);
      const ok = await new Promise<boolean>((resolve) => {
        c.once('error', () => resolve(false));
        c.once('close', () => resolve(false));
        c.once('connect', () =>
          c.subscribe(topics.clientRepliesFor(username), { qos: 1 }, (err, granted) => resolve(!err && granted?.[0]?.qos === 1)),
        );
        setTimeout(() => resolve(false), 5_000);
      });
      await c.endAsync(true);
      if (ok) break;
      if (Date.now() > until) throw new MeshError('MESH_NOT_CONNECTED', `NATS node ${url} never accepted a QoS 1 subscription`);
      await sleep(250);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ

export interface RabbitmqWithAuth {
  dir: string;
  cluster: RabbitmqCluster;
  auth: RabbitmqAuthHandle;
  operator: Identity;
  close(): Promise<void>;
}

/**
 * A 3-node RabbitMQ cluster whose users, vhost, resource and topic checks go to the mesh's HTTP auth service over a
 * fresh admission store trusting a fresh operator. Ports are picked free but may be taken by someone else before a
 * node binds them: it tries again with new ones, up to three times.
 */
export async function startRabbitmqWithAuth(logger: Logger): Promise<RabbitmqWithAuth> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'edge-mesh-rmq-'));
  const operator = generateIdentity('operator');
  const started = Date.now();
  let auth: RabbitmqAuthHandle | undefined;
  let c: RabbitmqCluster | undefined;
  for (let attempt = 1; !c; attempt++) {
    const ports = new Set<number>();
    while (ports.size < 3) ports.add(await freePort());
    const urls = [...ports].map((p) => `mqtt://127.0.0.1:${p}`);
    auth = await startRabbitmqAuth({
      trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }],
      dataDir: path.join(dir, `admissions-${attempt}`),
      brokerUrls: urls,
      logger,
    });
    try {
      c = await startRabbitmqCluster({
        dir: path.join(dir, `cluster-${attempt}`),
        conf: rabbitmqAuthConf(auth.url),
        mqttPorts: [...ports],
      });
    } catch (err) {
      await auth.close();
      if (attempt === 3) {
        await rm(dir, { recursive: true, force: true });
        throw err;
      }
      process.stderr.write(`# RabbitMQ cluster start failed, trying again: ${(err as Error).message}\n`);
    }
  }
  await auth!.ready;
  process.stderr.write(`# RabbitMQ: 3 nodes up and joined in ${Date.now() - started} ms\n`);
  const cluster = c;
  return {
    dir,
    cluster,
    auth: auth!,
    operator,
    async close() {
      // Bounded: a teardown that hangs must not hold the whole run.
      await Promise.race([auth!.close(), sleep(10_000)]);
      await cluster.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The engine the end-to-end suite runs on

/** What a client adds to its connection options on the engine (on RabbitMQ only QoS 0 subscriptions: the CONNECT token is checked). */
export interface EngineAccess {
  username?: string;
  password?: string;
  /** The file holding `password`, for `edge-mesh agent --password-file`. */
  passwordFile?: string;
  subscriptionQos?: 0;
  /**
   * The QoS of requests, replies, cancels, leases and vouchers (the `publishQos` option of the agent, SDK and router;
   * the tests' hand-made senders, test/helpers.ts `rawClient` and test/payer.ts, follow it too), when not 1. On NATS 2.9 a QoS 1 PUBLISH is stored in JetStream before it is delivered: 12 small messages took 45 ms to arrive
   * at QoS 1 and 7 ms at QoS 0 here, and a request with a 40 ms deadline (test/payments-mesh.test.ts) expired on the
   * way at QoS 1 instead of expiring in the agent's queue.
   */
  publishQos?: 0;
}

export interface ExternalEngine {
  readonly name: Exclude<EngineName, 'aedes'>;
  /** Every node's MQTT URL; a client gets them all, as a comma-separated list, the first node first. */
  readonly urls: readonly string[];
  /** Admits `identity` (idempotent) and resolves, once the engine accepts it, with what its connections add. */
  admit(identity: Identity): Promise<EngineAccess>;
  /**
   * Restarts the first node (the one every client tries first): it stops, stays down 300 ms, and starts again on the
   * same port. `at` is when clients can be back: when the server started again for a single server, when the node
   * went down for a cluster (the other nodes serve throughout); `done` resolves once the node takes connections again.
   */
  restartFirstNode(): Promise<{ at: number; done: Promise<void> }>;
  close(): Promise<void>;
}

/** The largest packet the engines take in the suite: the embedded broker's default is raised to this by the tests that need it. */
const MAX_PACKET_BYTES = (16 << 20) + 65_536;

/** A queue of admissions: one regeneration (or admin record) at a time. */
function serial() {
  let last: Promise<unknown> = Promise.resolve();
  return <T>(fn: () => Promise<T>): Promise<T> => {
    const next = last.then(fn, fn);
    last = next.catch(() => undefined);
    return next;
  };
}

/** Waits until `username` can connect to `url` with `password` (a reload has taken effect). */
async function acceptedOn(url: string, username: string, password: string, timeoutMs = 15_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const c = probeClient(url, username, password);
    const result = await new Promise<string>((resolve) => {
      c.once('connect', () => resolve('ok'));
      c.once('error', (err) => resolve(err.message));
      c.once('close', () => resolve('closed'));
    });
    await c.endAsync(result !== 'ok');
    if (result === 'ok') return;
    if (Date.now() > until) throw new MeshError('MESH_UNAUTHORIZED', `${username} is still refused on ${url}: ${result}`);
    await sleep(50);
  }
}

/**
 * `admit` for an engine that checks generated password files. Each new identity regenerates the files for every
 * identity so far (`regenerate` has the engine reload them and returns each id's password file), then waits until
 * `accepted` says the engine takes the identity's password. One regeneration at a time.
 */
function passwordAdmitter(
  seed: MosquittoIdentity,
  regenerate: (identities: MosquittoIdentity[]) => Promise<Map<string, string>>,
  accepted: (id: string, password: string) => Promise<void>,
  extra: Partial<EngineAccess> = {},
): ExternalEngine['admit'] {
  const admitted = new Map<string, { identity: MosquittoIdentity; access?: EngineAccess }>([[seed.id, { identity: seed }]]);
  const queue = serial();
  return (identity) =>
    queue(async () => {
      const known = admitted.get(identity.id)?.access;
      if (known) return known;
      admitted.set(identity.id, { identity: { id: identity.id, role: identity.role } });
      const secrets = await regenerate([...admitted.values()].map((a) => a.identity));
      const passwordFile = secrets.get(identity.id)!;
      const password = (await readFile(passwordFile, 'utf8')).trim();
      await accepted(identity.id, password);
      const access: EngineAccess = { username: identity.id, password, passwordFile, ...extra };
      admitted.get(identity.id)!.access = access;
      return access;
    });
}

async function mosquittoEngine(): Promise<ExternalEngine> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'edge-mesh-engine-mosq-'));
  const out = path.join(dir, 'mosquitto');
  const port = await freePort();
  const url = `mqtt://127.0.0.1:${port}`;
  // mosquitto takes no empty password file: the files start with one identity nobody uses.
  const placeholder: MosquittoIdentity = { id: generateIdentity('app').id, role: 'app' };
  let files = await writeMosquittoAuth(out, [placeholder], { port, host: '127.0.0.1' });
  const extra = [`max_packet_size ${MAX_PACKET_BYTES}`];
  let server = await startMosquitto(files.confFile, port, extra);
  return {
    name: 'mosquitto',
    urls: [url],
    admit: passwordAdmitter(
      placeholder,
      async (identities) => {
        files = await writeMosquittoAuth(out, identities, { port, host: '127.0.0.1' });
        server.child.kill('SIGHUP');
        return files.secrets;
      },
      (id, password) => acceptedOn(url, id, password),
    ),
    async restartFirstNode() {
      await server.stop();
      await sleep(300);
      const at = performance.now();
      server = await startMosquitto(files.confFile, port, extra);
      return { at, done: Promise.resolve() };
    },
    async close() {
      await server.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

async function natsEngine(): Promise<ExternalEngine> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'edge-mesh-engine-nats-'));
  const out = path.join(dir, 'nats');
  const { nodes } = await natsClusterPorts();
  const options = { nodes, maxPayloadBytes: MAX_PACKET_BYTES };
  const probe = generateIdentity('app');
  let files = await writeNatsAuth(out, [{ id: probe.id, role: 'app' }], options);
  const started = Date.now();
  const procs = await startNatsNodes(files.nodeConfs);
  const urls = procs.map((p) => p.url);
  const probePassword = (await readFile(files.secrets.get(probe.id)!, 'utf8')).trim();
  await natsClusterReady(urls, probe.id, probePassword);
  process.stderr.write(`# NATS: 3 nodes up with JetStream in ${Date.now() - started} ms\n`);
  return {
    name: 'nats',
    urls,
    admit: passwordAdmitter(
      { id: probe.id, role: 'app' },
      async (identities) => {
        files = await writeNatsAuth(out, identities, options);
        await reloadNatsNodes(files.nodeConfs.map((n) => n.pidFile));
        return files.secrets;
      },
      async (id, password) => {
        for (const p of procs) if (p.child.exitCode === null) await acceptedOn(p.url, id, password);
      },
      // QoS 0 subscriptions and publishes, as docs/operations.md recommends on NATS (nothing waits for JetStream).
      { subscriptionQos: 0, publishQos: 0 },
    ),
    async restartFirstNode() {
      const first = procs[0]!;
      await first.stop();
      const at = performance.now();
      await sleep(300);
      const again = startNatsNode({ name: first.name, conf: first.conf, mqttUrl: first.url });
      procs[0] = again;
      const done = (async () => {
        await natsNodeListening(again);
        await natsClusterReady([again.url], probe.id, probePassword);
      })();
      return { at, done };
    },
    async close() {
      await Promise.all(procs.map((p) => p.stop()));
      await rm(dir, { recursive: true, force: true });
    },
  };
}

async function rabbitmqEngine(logger: Logger): Promise<ExternalEngine> {
  const r = await startRabbitmqWithAuth(logger);
  const admitted = new Set<string>();
  const queue = serial();
  const first = r.cluster.nodes[0]!;
  return {
    name: 'rabbitmq',
    urls: r.cluster.urls,
    admit: (identity) =>
      queue(async () => {
        // Straight into the service's admission store (what an admission record on the admin topic ends in).
        if (!admitted.has(identity.id)) await r.auth.admit(admit(r.operator, identity));
        admitted.add(identity.id);
        // QoS 0 subscriptions, as `--engine rabbitmq` sets (client/src/transport.ts, engineDefaults).
        return { subscriptionQos: 0 };
      }),
    async restartFirstNode() {
      // The RabbitMQ application on the node stops (every listener and connection with it) and starts again; the
      // Erlang VM, and with it the node's cluster membership, stays.
      await r.cluster.ctl(first, ['stop_app']);
      const at = performance.now();
      await sleep(300);
      const done = (async () => {
        await r.cluster.ctl(first, ['start_app']);
        while (!(await listening('127.0.0.1', first.mqttPort))) await sleep(100);
      })();
      return { at, done };
    },
    close: () => r.close(),
  };
}

let shared: Promise<ExternalEngine> | undefined;

/** The engine named by MESH_TEST_ENGINE, started on first use and stopped after the test file. */
export function sharedEngine(logger: Logger): Promise<ExternalEngine> {
  if (ENGINE === 'aedes') throw new MeshError('MESH_CONFIG', 'the embedded broker is started per test (test/helpers.ts, brokerFor)');
  if (ENGINE_SKIP) throw new MeshError('MESH_CONFIG', ENGINE_SKIP);
  shared ??= ENGINE === 'mosquitto' ? mosquittoEngine() : ENGINE === 'nats' ? natsEngine() : rabbitmqEngine(logger);
  return shared;
}

after(async () => {
  if (!shared) return;
  const engine = await shared.catch(() => undefined);
  await engine?.close();
});
