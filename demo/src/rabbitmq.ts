/**
 * A throwaway RabbitMQ cluster on this machine, for tests and benchmarks (docs/operations.md, "Running on RabbitMQ"):
 * N nodes of Debian's rabbitmq-server with the MQTT plugin and rabbitmq_auth_backend_http, each with its own node
 * name, ports (picked free at run time), data and log folders under `dir`, and one Erlang cookie, joined with
 * `rabbitmqctl join_cluster` as the RabbitMQ clustering guide describes for several nodes on one host.
 *
 * The scripts are run from /usr/lib/rabbitmq/bin: Debian's /usr/sbin wrappers switch to the `rabbitmq` user,
 * which could not read the folders made here.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, readFile, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { MeshError } from '@edge-mesh/protocol';
import { freePort } from './host.ts';

const run = promisify(execFile);
const BIN = '/usr/lib/rabbitmq/bin';

/** The rabbitmq-server script when Debian's rabbitmq-server is installed; undefined otherwise. */
export function rabbitmqServerCommand(): string | undefined {
  const file = path.join(BIN, 'rabbitmq-server');
  return existsSync(file) ? file : undefined;
}

export interface RabbitmqNode {
  /** Erlang node name, `name@localhost`. */
  readonly name: string;
  readonly mqttPort: number;
  /** `mqtt://127.0.0.1:port` */
  readonly url: string;
  /** The Erlang VM's pid (from the node's pid file), 0 before it started. */
  beamPid: number;
  /** True until the node was killed or stopped. */
  readonly running: boolean;
  /** SIGKILL to the Erlang VM: the node dies as on a power cut. */
  kill9(): void;
}

export interface RabbitmqCluster {
  readonly nodes: RabbitmqNode[];
  /** Every node's MQTT URL. */
  readonly urls: string[];
  /** Runs rabbitmqctl against `node` and returns its stdout. */
  ctl(node: RabbitmqNode, args: string[], timeoutMs?: number): Promise<string>;
  /** Kills every node (SIGKILL: nothing of it is kept). */
  close(): Promise<void>;
}

export interface RabbitmqClusterOptions {
  /** Folder for the nodes' configuration, data and logs (made if missing). */
  dir: string;
  size?: number;
  /** Lines added to every node's rabbitmq.conf (e.g. `rabbitmqAuthConf` of the broker package). */
  conf?: string;
  /** Fixed MQTT ports, one per node; free ports otherwise. */
  mqttPorts?: number[];
  /** How long to wait for all nodes to be up and joined. Default 120 s. */
  timeoutMs?: number;
}

function portOpen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1', () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

/** Starts the nodes, joins them into one cluster and resolves once every node's MQTT port takes connections. */
export async function startRabbitmqCluster(o: RabbitmqClusterOptions): Promise<RabbitmqCluster> {
  const server = rabbitmqServerCommand();
  if (!server) throw new MeshError('MESH_CONFIG', 'rabbitmq-server is not installed (Debian package `rabbitmq-server`)');
  const size = o.size ?? 3;
  const deadline = Date.now() + (o.timeoutMs ?? 120_000);
  const home = path.join(o.dir, 'home');
  await mkdir(home, { recursive: true });
  const cookie = path.join(home, '.erlang.cookie');
  await writeFile(cookie, randomBytes(16).toString('hex').toUpperCase(), { mode: 0o400 });
  await chmod(cookie, 0o400);
  const prefix = `em${randomBytes(3).toString('hex')}`;
  const children: ChildProcess[] = [];
  const nodes: (RabbitmqNode & { env: NodeJS.ProcessEnv; pidFile: string; logs: string; alive: boolean })[] = [];

  for (let i = 0; i < size; i++) {
    const nodeDir = path.join(o.dir, `n${i + 1}`);
    await mkdir(nodeDir, { recursive: true });
    const [amqpPort, distPort] = [await freePort(), await freePort()];
    const mqttPort = o.mqttPorts?.[i] ?? (await freePort());
    const conf = [
      `listeners.tcp.default = 127.0.0.1:${amqpPort}`,
      `mqtt.listeners.tcp.default = 127.0.0.1:${mqttPort}`,
      'mqtt.vhost = /',
      'mqtt.exchange = amq.topic',
      // This folder may sit on a disk with little free space; the default limit of 50 MB blocks publishers when hit.
      'disk_free_limit.absolute = 10MB',
      'log.console = false',
      'log.file.level = info',
      o.conf ?? '',
    ].join('\n');
    await writeFile(path.join(nodeDir, 'rabbitmq.conf'), `${conf}\n`);
    await writeFile(path.join(nodeDir, 'enabled_plugins'), '[rabbitmq_mqtt,rabbitmq_auth_backend_http].\n');
    const name = `${prefix}n${i + 1}@localhost`;
    const pidFile = path.join(nodeDir, 'beam.pid');
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      HOME: home,
      RABBITMQ_NODENAME: name,
      RABBITMQ_NODE_PORT: String(amqpPort),
      RABBITMQ_DIST_PORT: String(distPort),
      RABBITMQ_MNESIA_BASE: path.join(nodeDir, 'mnesia'),
      RABBITMQ_LOG_BASE: path.join(nodeDir, 'log'),
      RABBITMQ_CONFIG_FILE: path.join(nodeDir, 'rabbitmq.conf'),
      RABBITMQ_ADVANCED_CONFIG_FILE: path.join(nodeDir, 'advanced.config'),
      RABBITMQ_ENABLED_PLUGINS_FILE: path.join(nodeDir, 'enabled_plugins'),
      RABBITMQ_CONF_ENV_FILE: path.join(nodeDir, 'rabbitmq-env.conf'),
      RABBITMQ_PID_FILE: pidFile,
      // An Erlang VM that dies (a node, or rabbitmqctl's own) writes its crash dump here, not into the caller's folder.
      ERL_CRASH_DUMP: path.join(nodeDir, 'erl_crash.dump'),
      // Idle schedulers sleep instead of spinning: the machine is shared.
      RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS: '+sbwt none +sbwtdcpu none +sbwtdio none',
    };
    const node = {
      name,
      mqttPort,
      url: `mqtt://127.0.0.1:${mqttPort}`,
      beamPid: 0,
      env,
      pidFile,
      logs: path.join(nodeDir, 'log'),
      alive: true,
      get running() {
        return this.alive;
      },
      kill9() {
        if (!this.alive) return;
        this.alive = false;
        if (this.beamPid > 0) {
          try {
            process.kill(this.beamPid, 'SIGKILL');
          } catch {}
        }
      },
    };
    nodes.push(node);
  }

  const ctl = async (node: RabbitmqNode, args: string[], timeoutMs = 60_000): Promise<string> => {
    const n = nodes.find((x) => x.name === node.name)!;
    try {
      const { stdout } = await run(path.join(BIN, 'rabbitmqctl'), ['-n', n.name, '-q', ...args], { env: n.env, timeout: timeoutMs });
      return stdout;
    } catch (err) {
      const e = err as { stderr?: string; message: string };
      throw new MeshError('MESH_CONFIG', `rabbitmqctl ${args.join(' ')} on ${n.name}: ${e.stderr?.trim() || e.message}`);
    }
  };

  const close = async () => {
    for (const n of nodes) {
      if (n.beamPid === 0) {
        try {
          n.beamPid = Number((await readFile(n.pidFile, 'utf8')).trim()) || 0;
        } catch {}
      }
      n.kill9();
    }
    // Each node runs in its own process group (the script, the Erlang VM and its helper): kill the whole group.
    killGroups();
    process.off('exit', killGroups);
  };

  // Whatever way this process ends, the nodes end with it (a test that fails mid-way never leaves one behind).
  const killGroups = () => {
    for (const c of children) {
      if (c.pid === undefined) continue;
      try {
        process.kill(-c.pid, 'SIGKILL');
      } catch {}
    }
  };
  // First among the exit handlers, so the nodes are gone before anyone removes their folders.
  process.prependOnceListener('exit', killGroups);
  try {
    for (const n of nodes) {
      const child = spawn(server, [], { env: n.env, stdio: 'ignore', detached: true });
      children.push(child);
    }
    const remaining = () => Math.max(1_000, deadline - Date.now());
    // await_startup fails at once while the VM has not registered with epmd yet: ask again until the deadline.
    await Promise.all(
      nodes.map(async (n, i) => {
        for (;;) {
          const child = children[i]!;
          if (child.exitCode !== null)
            throw new MeshError('MESH_CONFIG', `RabbitMQ node ${n.name} exited (${child.exitCode}); see ${n.logs}`);
          try {
            await ctl(n, ['await_startup'], remaining());
            return;
          } catch (err) {
            if (Date.now() > deadline) throw err;
            await new Promise((r) => setTimeout(r, 500));
          }
        }
      }),
    );
    for (const n of nodes) n.beamPid = Number((await readFile(n.pidFile, 'utf8')).trim());
    const first = nodes[0]!;
    for (const n of nodes.slice(1)) {
      await ctl(n, ['stop_app'], remaining());
      await ctl(n, ['join_cluster', first.name], remaining());
      await ctl(n, ['start_app'], remaining());
    }
    for (const n of nodes) {
      while (!(await portOpen(n.mqttPort))) {
        if (Date.now() > deadline) throw new MeshError('MESH_CONFIG', `RabbitMQ node ${n.name} did not open MQTT port ${n.mqttPort}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  } catch (err) {
    await close();
    throw err;
  }
  return { nodes, urls: nodes.map((n) => n.url), ctl, close };
}
