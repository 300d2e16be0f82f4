/**
 * Shared fixtures: a real broker on port 0, a models folder built from the npm packages, agents. The end-to-end suite
 * takes its broker from `meshBrokerFor`, which is the embedded broker or, with MESH_TEST_ENGINE, an external engine
 * (test/engines.ts); the helpers below admit every identity they connect on such an engine first.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { copyFile, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { type AgentHandle, type AgentOptions, startAgent } from '@edge-mesh/agent';
import { type BrokerHandle, startBroker } from '@edge-mesh/broker';
import { openMeshConnection } from '@edge-mesh/client';
import { ensureModelsFolder, sampleInputs } from '@edge-mesh/demo';
import {
  decodeMessage,
  type ErrorReply,
  encodeKeyFile,
  encodeMessage,
  generateIdentity,
  type Identity,
  type InferReply,
  type InferRequest,
  MeshError,
  type Message,
  requestIdHex,
  topics,
} from '@edge-mesh/protocol';
import { type RouterHandle, startRouter } from '@edge-mesh/router';
import { type ConnectOptions, connect, type Mesh } from '@edge-mesh/sdk';
import type { MqttClient } from 'mqtt';
import pino from 'pino';
import { ENGINE, type EngineAccess, type EngineName, type ExternalEngine, sharedEngine } from './engines.ts';

export const ROOT = path.resolve(import.meta.dirname, '..');
export const quiet = pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' });

/** One models folder per test process, built from the npm packages (hash-checked, reused when valid). */
let modelsDirPromise: Promise<string> | undefined;
/** Blocks this process's event loop for `ms`, as a large JSON.parse or a busy core does. */
export function busyWait(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    // the event loop is blocked
  }
}

export function modelsDir(): Promise<string> {
  modelsDirPromise ??= (async () => {
    const dir = path.join(os.tmpdir(), 'edge-mesh-test-models');
    await ensureModelsFolder(dir);
    return dir;
  })();
  return modelsDirPromise;
}

export async function tempDir(t: TestContext, prefix = 'edge-mesh-'): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix));
  // After hooks run in the order they were added, so processes a test starts later (a NATS node writing its
  // JetStream files, say) may still write here while this runs: retried on ENOTEMPTY and EBUSY, and never thrown,
  // since a hook that throws stops the hooks after it, and those stop the processes (a CI run once hung on that).
  t.after(async () => {
    try {
      await rm(dir, { recursive: true, force: true, maxRetries: 10, retryDelay: 50 });
    } catch (err) {
      t.diagnostic(`temporary folder ${dir} left behind: ${(err as Error).message}`);
    }
  });
  return dir;
}

export async function brokerFor(t: TestContext, options: Parameters<typeof startBroker>[0] = {}): Promise<BrokerHandle> {
  const broker = await startBroker({ port: 0, logger: quiet, ...options });
  t.after(() => broker.close());
  return broker;
}

/** The broker of the end-to-end suite: what the tests use of it, on every engine. */
export interface MeshBroker {
  readonly engine: EngineName;
  /** The URL (a comma-separated list on a cluster) clients connect to. */
  readonly url: string;
  /**
   * Restarts the broker on the same port (on a cluster: the node every client tries first). `at` is when clients can
   * be back (the restart for a single broker, the node's loss on a cluster); `done` once the restarted broker serves.
   */
  restart(): Promise<{ at: number; done: Promise<void> }>;
}

/** External engines by the URL list they were handed out as, so the helpers below know where they connect. */
const engineByUrl = new Map<string, ExternalEngine>();

/**
 * The broker for an end-to-end test: a fresh embedded broker (closed after the test, `options` applied), or the file's
 * external engine (test/engines.ts) when MESH_TEST_ENGINE names one. On an engine `options.maxPacketBytes` may be at
 * most the 16 MiB + 64 KiB the engines are started with.
 */
export async function meshBrokerFor(t: TestContext, options: Parameters<typeof startBroker>[0] = {}): Promise<MeshBroker> {
  if (ENGINE === 'aedes') {
    let broker = await brokerFor(t, options);
    const port = broker.port;
    return {
      engine: ENGINE,
      url: broker.url,
      async restart() {
        await broker.close();
        await new Promise((r) => setTimeout(r, 300));
        const at = performance.now();
        broker = await brokerFor(t, { ...options, port });
        return { at, done: Promise.resolve() };
      },
    };
  }
  if ((options.maxPacketBytes ?? 0) > (16 << 20) + 65_536)
    throw new MeshError('MESH_CONFIG', `the engines take packets up to 16 MiB + 64 KiB, not ${options.maxPacketBytes}`);
  const engine = await sharedEngine(quiet);
  const url = engine.urls.join(',');
  engineByUrl.set(url, engine);
  return { engine: ENGINE, url, restart: () => engine.restartFirstNode() };
}

/** What a connection of `identity` to `brokerUrl` adds to its options: nothing on the embedded broker. */
export async function accessFor(brokerUrl: string, identity: Identity): Promise<EngineAccess> {
  const engine = engineByUrl.get(brokerUrl);
  return engine ? engine.admit(identity) : {};
}

/** Connection options: the access minus the password file (which only the CLI takes). */
function connectionAccess({ passwordFile: _, ...access }: EngineAccess) {
  return access;
}

const requestQosOf = (access: EngineAccess): 0 | 1 => access.publishQos ?? 1;

/** Identities standing for the free-form client ids the tests name, one per name, on an external engine. */
const namedIdentities = new Map<string, Identity>();

/**
 * The client id and connection options for a test client called `name`: on the embedded broker the name itself,
 * anonymous; on an external engine an admitted app identity standing for that name (the same one every time).
 */
export async function namedClient(
  brokerUrl: string,
  name: string,
): Promise<{
  clientId: string;
  identity?: Identity;
  username?: string;
  password?: string;
  subscriptionQos?: 0;
  publishQos?: 0;
  /** The QoS to publish requests at (test/engines.ts, `EngineAccess.publishQos`). */
  requestQos: 0 | 1;
}> {
  if (!engineByUrl.has(brokerUrl)) return { clientId: name, requestQos: 1 };
  let identity = namedIdentities.get(name);
  if (!identity) {
    identity = generateIdentity('app');
    namedIdentities.set(name, identity);
  }
  const access = await accessFor(brokerUrl, identity);
  return { clientId: identity.id, identity, ...connectionAccess(access), requestQos: requestQosOf(access) };
}

/** An in-process agent with a fresh agent key unless `identity` is given. */
export async function agentFor(t: TestContext, options: Partial<AgentOptions> & { brokerUrl: string }): Promise<AgentHandle> {
  const identity = options.identity ?? generateIdentity('agent');
  const agent = await startAgent({
    modelsDir: await modelsDir(),
    workers: 1,
    logger: quiet,
    identity,
    ...connectionAccess(await accessFor(options.brokerUrl, identity)),
    ...options,
  });
  t.after(() => agent.close());
  return agent;
}

export async function meshFor(t: TestContext, options: Partial<ConnectOptions> & { brokerUrl: string }): Promise<Mesh> {
  // On an external engine the SDK's own ephemeral key would not be admitted: make one here and admit it.
  const identity = options.identity ?? (engineByUrl.has(options.brokerUrl) ? generateIdentity('app') : undefined);
  const access = identity ? connectionAccess(await accessFor(options.brokerUrl, identity)) : {};
  const mesh = await connect({ logger: quiet, ...(identity ? { identity } : {}), ...access, ...options });
  t.after(() => mesh.close());
  return mesh;
}

/** Writes `identity` as a key file (mode 0600) in a fresh temp folder and returns its path. */
export async function keyFileFor(t: TestContext, identity: Identity): Promise<string> {
  const file = path.join(await tempDir(t, 'edge-mesh-key-'), `${identity.id}.key`);
  await writeFile(file, encodeKeyFile(identity), { mode: 0o600 });
  return file;
}

/**
 * A bare MQTT client that speaks the envelope by hand, for malformed and hand-made messages. Give it
 * an identity to connect to an authenticated broker; a plain id connects anonymously (open broker).
 */
export async function rawClient(t: TestContext, brokerUrl: string, who: string | Identity) {
  // On an external engine a plain id stands for an admitted identity: use `clientId` of the result in topics.
  const { requestQos, ...named } =
    typeof who === 'string'
      ? await namedClient(brokerUrl, who)
      : await accessFor(brokerUrl, who).then((access) => ({
          clientId: who.id,
          identity: who,
          ...connectionAccess(access),
          requestQos: requestQosOf(access),
        }));
  const { clientId } = named;
  const replies = new Map<string, (m: InferReply | ErrorReply) => void>();
  const connection = openMeshConnection(brokerUrl, {
    ...named,
    onConnect: (c: MqttClient) => c.subscribe(topics.clientRepliesFor(clientId), { qos: 1 }),
  });
  t.after(() => connection.close());
  connection.client.on('message', (_topic, payload) => {
    const reply = decodeMessage(payload, ['res', 'err']);
    replies.get(requestIdHex(reply.id))?.(reply);
  });
  await connection.firstConnect;
  await new Promise((r) => setTimeout(r, 50));
  return {
    clientId,
    client: connection.client,
    /** Publishes a request (a message or raw bytes) and waits for the reply carrying `id`. */
    request(agentId: string, id: Uint8Array, payload: Message | Uint8Array, timeoutMs = 5_000): Promise<InferReply | ErrorReply> {
      return new Promise((resolve, reject) => {
        const key = requestIdHex(id);
        const timer = setTimeout(() => reject(new Error(`no reply for ${key}`)), timeoutMs);
        replies.set(key, (m) => {
          clearTimeout(timer);
          replies.delete(key);
          resolve(m);
        });
        const bytes = payload instanceof Uint8Array ? payload : encodeMessage(payload);
        connection.client.publish(topics.agentRequest(agentId, clientId), Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength), {
          qos: requestQos,
        });
      });
    },
  };
}

/**
 * Runs `edge-mesh agent --key` as a child process (key file written for `identity`) and resolves once it has announced
 * itself; `stderrText()` is its log so far. Later options in `extraArgs` override earlier ones (`--models DIR`). `env` is
 * added to this process's environment for it (MESH_AGENT_FAULTS).
 */
export async function spawnAgent(
  t: TestContext,
  brokerUrl: string,
  identity: Identity,
  extraArgs: string[] = [],
  env: Record<string, string> = {},
): Promise<ChildProcess & { stderrText(): string }> {
  const agentId = identity.id;
  const keyFile = await keyFileFor(t, identity);
  const access = await accessFor(brokerUrl, identity);
  const accessArgs = [
    ...(access.username !== undefined ? ['--username', access.username] : []),
    ...(access.passwordFile !== undefined ? ['--password-file', access.passwordFile] : []),
    // NATS's settings as an operator gives them (docs/operations.md): `--engine nats`, which also stops the retained status.
    ...(access.subscriptionQos === 0 && access.publishQos === 0
      ? ['--engine', 'nats']
      : [
          ...(access.subscriptionQos !== undefined ? ['--subscription-qos', String(access.subscriptionQos)] : []),
          ...(access.publishQos !== undefined ? ['--publish-qos', String(access.publishQos)] : []),
        ]),
  ];
  const child = spawn(
    process.execPath,
    [
      path.join(ROOT, 'cli/bin/edge-mesh.mjs'),
      'agent',
      '--models',
      await modelsDir(),
      '--broker',
      brokerUrl,
      '--key',
      keyFile,
      '--workers',
      '1',
      ...accessArgs,
      ...extraArgs,
    ],
    { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...env } },
  );
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  let stderr = '';
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`agent ${agentId} did not announce:\n${stderr}`)), 30_000);
    child.stderr!.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
      if (stderr.includes('"msg":"announced"')) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.on('exit', (code) => reject(new Error(`agent ${agentId} exited early (${code}):\n${stderr}`)));
  });
  return Object.assign(child, { stderrText: () => stderr });
}

export function waitFor(predicate: () => boolean, timeoutMs: number, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const until = Date.now() + timeoutMs;
    const tick = () => {
      if (predicate()) return resolve();
      if (Date.now() > until) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 10);
    };
    tick();
  });
}

/** A router on `brokerUrl` with a fresh identity and a quiet logger, closed after the test. */
export async function routerFor(
  t: TestContext,
  brokerUrl: string,
  options: Partial<Parameters<typeof startRouter>[0]> = {},
): Promise<RouterHandle> {
  const identity = options.identity ?? generateIdentity('router');
  const router = await startRouter({
    brokerUrl,
    identity,
    logger: quiet,
    ...connectionAccess(await accessFor(brokerUrl, identity)),
    ...options,
  });
  t.after(() => router.close());
  return router;
}

/**
 * Sends `messages` to `agentId` back to back on an agent whose queue holds two, and checks what such a
 * burst must give: every answer ok or MESH_BUSY, most refused, the first three served, and the first
 * refusal back before the last queued answer. Returns the refusals and the answers.
 */
export async function assertBusyBurst(raw: Awaited<ReturnType<typeof rawClient>>, agentId: string, messages: InferRequest[]) {
  const started = performance.now();
  const results = await Promise.all(
    messages.map((m) => raw.request(agentId, m.id, m, 20_000).then((r) => ({ r, ms: performance.now() - started }))),
  );
  const codes = results.map(({ r }) => (r.kind === 'err' ? r.code : 'ok'));
  const busy = results.filter(({ r }) => r.kind === 'err' && r.code === 'MESH_BUSY');
  const ok = results.filter(({ r }) => r.kind === 'res');
  assert.equal(busy.length + ok.length, messages.length, codes.join(','));
  // One runs and two wait while the burst arrives: most are refused, the first three are served.
  assert.ok(busy.length >= 5, codes.join(','));
  assert.deepEqual(codes.slice(0, 3), ['ok', 'ok', 'ok']);
  // Refusals do not wait for the queue: the first comes back before the queued work is done.
  assert.ok(Math.min(...busy.map((b) => b.ms)) < Math.max(...ok.map((o) => o.ms)));
  return { busy, ok };
}

/** A models folder with the wake-word model only, so twenty agents start fast and stay small. */
export async function kwsOnlyDir(t: TestContext): Promise<string> {
  const full = await modelsDir();
  const manifest = JSON.parse(await readFile(path.join(full, 'manifest.json'), 'utf8')) as { models: { name: string; file: string }[] };
  const kws = manifest.models.filter((m) => m.name === 'kws');
  assert.equal(kws.length, 1);
  const dir = await tempDir(t, 'edge-mesh-kws-');
  await copyFile(path.join(full, kws[0]!.file), path.join(dir, kws[0]!.file));
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ ...manifest, models: kws }));
  return dir;
}

/** Packet and message bound for the tests that send `expireBehindDetection`'s 19.7 MB detection. */
export const LARGE_DETECTION_BYTES = 32 << 20;

/**
 * Sends a wake-word request that times out in the agent's queue, behind a large detection that holds the worker
 * (the agent must run every model on one worker, one job at a time), and returns once the detection is answered.
 * The detection is 16 times the size of the one its service time was measured on (the 320×320 warm-up), so it
 * runs far longer than the agent expects. The request's deadline comes from the agent's own figures: long enough
 * to pass its admission (half the detection's service time, plus the request's own) and to reach its queue on a
 * loaded machine, short enough to pass while the detection runs. A fixed 40 ms was refused at admission, or
 * expired before it reached the queue (then, correctly, with no receipt), on a machine with two busy cores.
 */
export async function expireBehindDetection(mesh: Mesh, agent: AgentHandle): Promise<void> {
  const big = mesh.infer(
    'ocr-det',
    { x: { dtype: 'float32', shape: [1, 3, 1280, 1280], data: new Float32Array(3 * 1280 * 1280) } },
    { deadlineMs: 60_000 },
  );
  await waitFor(() => agent.loadReport().inFlight === 1, 10_000, 'the detection running');
  const load = agent.loadReport().models;
  const estimateMs = load['ocr-det']!.serviceMs / 2 + load.kws!.serviceMs;
  await assert.rejects(
    mesh.infer('kws', sampleInputs('kws', 99), { deadlineMs: Math.ceil(2 * estimateMs + 100) }),
    (err: unknown) => err instanceof MeshError && err.code === 'MESH_DEADLINE_EXCEEDED',
  );
  assert.equal(agent.loadReport().inFlight, 1, 'the detection still runs: the request expired behind it, in the queue');
  await big;
}

/**
 * A TCP relay to `port` on 127.0.0.1, on a port of its own (`url` names it with `scheme`). `refuse()` stops taking new
 * connections and `drop()` cuts the open ones. `hold()` keeps what the target sends, in order, until `release()`
 * writes each connection's held bytes to it at once, as a target that got ahead of a busy client would. `tap` is called
 * for each connection, and what it returns sees each chunk that client sends, as one read returned it.
 */
export async function tcpRelay(t: TestContext, port: number, options: { scheme?: string; tap?: () => (chunk: Buffer) => void } = {}) {
  const sockets = new Set<net.Socket>();
  let accepting = true;
  let held: Map<net.Socket, Buffer[]> | undefined;
  let heldBytes = 0;
  const server = net.createServer((client) => {
    if (!accepting) return client.destroy();
    const upstream = net.connect(port, '127.0.0.1');
    const tapped = options.tap?.();
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.setNoDelay(true);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => {});
    }
    client.on('data', (chunk: Buffer) => {
      tapped?.(chunk);
      upstream.write(chunk);
    });
    upstream.on('data', (chunk: Buffer) => {
      if (!held) return void client.write(chunk);
      const parts = held.get(client);
      if (parts) parts.push(chunk);
      else held.set(client, [chunk]);
      heldBytes += chunk.length;
    });
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });
  return {
    url: `${options.scheme ?? 'mqtt'}://127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    refuse() {
      accepting = false;
    },
    drop() {
      for (const s of sockets) s.destroy();
    },
    hold() {
      held ??= new Map();
    },
    release() {
      const chunks = held;
      held = undefined;
      for (const [client, parts] of chunks ?? []) client.write(Buffer.concat(parts));
    },
    /** Bytes held since the relay started. */
    heldBytes: () => heldBytes,
  };
}
