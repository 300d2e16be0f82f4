/**
 * `edge-mesh auth nats` (docs/cli.md; docs/operations.md, "Running on a NATS cluster"): the mesh's admitted
 * identities as a NATS 2.9 cluster's configuration, one file per node plus a shared `accounts.conf`, and one
 * password file per identity for its `--username ID --password-file FILE`. The files are written by the broker
 * package (broker/src/nats.ts); `--reload` signals the nodes running here to read them again.
 */
import type { NatsNode } from '@edge-mesh/broker';
import { MeshError } from '@edge-mesh/protocol';
import { type Command, InvalidArgumentError } from 'commander';
import { admittedIdentities } from './auth.ts';
import { collect, positiveInt } from './options.ts';

function port(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 65_535) throw new InvalidArgumentError('must be a port, 1-65535');
  return n;
}

interface NatsAuthOpts {
  out: string;
  identity: string[];
  data?: string;
  operator: string[];
  nodes: number;
  nodeHost: string[];
  host: string;
  mqttPort: number;
  clientPort: number;
  clusterPort: number;
  clusterName: string;
  streamReplicas?: number;
  storeDir?: string;
  reload: boolean;
}

/**
 * The nodes: with `--node-host` one per host, each with the same three ports; otherwise `--nodes` on `--host`
 * with consecutive ports (a cluster on one machine, for trying it out and for the tests).
 */
export function natsNodesFrom(
  o: Pick<NatsAuthOpts, 'nodes' | 'nodeHost' | 'host' | 'mqttPort' | 'clientPort' | 'clusterPort'>,
): NatsNode[] {
  if (o.nodeHost.length > 0)
    return o.nodeHost.map((host, i) => ({
      name: `mesh-${i + 1}`,
      host,
      mqttPort: o.mqttPort,
      clientPort: o.clientPort,
      clusterPort: o.clusterPort,
    }));
  const last = Math.max(o.mqttPort, o.clientPort, o.clusterPort) + o.nodes - 1;
  if (last > 65_535) throw new MeshError('MESH_CONFIG', `--nodes ${o.nodes} from these ports would go past port 65535`);
  return Array.from({ length: o.nodes }, (_, i) => ({
    name: `mesh-${i + 1}`,
    host: o.host,
    mqttPort: o.mqttPort + i,
    clientPort: o.clientPort + i,
    clusterPort: o.clusterPort + i,
  }));
}

export function registerNatsAuthCommand(auth: Command): void {
  auth
    .command('nats')
    .description(
      'write a NATS 2.9 cluster configuration (one file per node: cluster, JetStream, MQTT; a shared accounts.conf with one user per admitted id and its topic rights) and a password file (0600) per identity; after a revocation run it again with --reload, or reload every node yourself',
    )
    .requiredOption('--out <dir>', 'folder to write mesh-N.conf, accounts.conf, route.secret and secrets/{id}.password into')
    .option('--identity <file>', 'an identity to admit: key file, `keys show` output, or a JSON list of them (repeatable)', collect, [])
    .option(
      '--data <dir>',
      "an embedded broker's admission store (`edge-mesh broker --data`): admit what it admits (the broker must be stopped)",
    )
    .option('--operator <key>', 'with --data: a trusted operator, as for `edge-mesh broker --operator` (repeatable)', collect, [])
    .option('--nodes <n>', 'cluster nodes on --host, with consecutive ports', positiveInt, 3)
    .option('--node-host <host>', 'one node per host, each on the same ports (repeatable; replaces --nodes and --host)', collect, [])
    .option('--host <host>', 'the address every listener binds, with --nodes', '127.0.0.1')
    .option('--mqtt-port <port>', 'MQTT listener of the first node', port, 1883)
    .option('--client-port <port>', 'NATS client listener of the first node (no mesh user may connect there)', port, 4222)
    .option('--cluster-port <port>', 'cluster route listener of the first node', port, 6222)
    .option('--cluster-name <name>', 'the cluster name', 'mesh')
    .option('--stream-replicas <n>', 'replicas of the MQTT streams (sessions, messages, retained); default min(3, nodes)', positiveInt)
    .option('--store-dir <dir>', "folder for each node's JetStream store, as DIR/mesh-N/jetstream (default --out)")
    .option('--reload', 'afterwards send SIGHUP to every node running here (its pid file in --out)', false)
    .action(async (opts: NatsAuthOpts) => {
      const { reloadNatsNodes, writeNatsAuth } = await import('@edge-mesh/broker');
      const identities = await admittedIdentities(opts);
      const files = await writeNatsAuth(opts.out, identities, {
        nodes: natsNodesFrom(opts),
        clusterName: opts.clusterName,
        ...(opts.streamReplicas !== undefined ? { streamReplicas: opts.streamReplicas } : {}),
        ...(opts.storeDir !== undefined ? { storeDir: opts.storeDir } : {}),
      });
      const reload = opts.reload ? await reloadNatsNodes(files.nodeConfs.map((n) => n.pidFile)) : undefined;
      process.stdout.write(
        `${JSON.stringify({
          accounts: files.accountsFile,
          nodes: files.nodeConfs,
          brokers: files.nodeConfs.map((n) => n.mqttUrl).join(','),
          identities: identities.map((i) => ({ id: i.id, role: i.role, passwordFile: files.secrets.get(i.id) })),
          removed: files.removed,
          revoked: files.revoked,
          ...(reload ? { reloaded: reload.reloaded, notRunning: reload.notRunning } : {}),
        })}\n`,
      );
    });
}
