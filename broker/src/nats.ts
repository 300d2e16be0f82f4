/**
 * The mesh's identities and topic rights for a NATS 2.9 cluster with MQTT and JetStream as an external broker
 * (docs/operations.md, "Running on a NATS cluster"): one configuration per node, a shared `accounts.conf` with one
 * user per admitted id, and one secret file per id for its `--username ID --password-file FILE`.
 *
 * Why passwords and not the mesh's signed CONNECT tokens: NATS 2.9 checks a CONNECT only against its own user
 * list, nkeys or JWTs; handing the decision to an outside service (auth callout) arrived in 2.10. So the admission
 * is turned into a user ahead of time: username = mesh id, password = a random per-id secret, stored as a bcrypt
 * hash (nats-io/nats-server server/auth.go, `isBcrypt`, accepts `$2a$`/`$2b$` hashes).
 *
 * The rights are the per-role MQTT topic rules of broker/src/mosquitto.ts (the same table as broker/src/acl.ts),
 * written as NATS subjects the way NATS's MQTT layer converts topics (server/mqtt.go,
 * `mqttToNATSSubjectConversion`): `/` becomes `.`, `+` becomes `*`, `#` becomes `>`. A topic with `.` or a space
 * cannot be converted (NATS refuses it); mesh topics hold only `[a-z0-9-]` ids and fixed words, so none has one.
 *
 * What else an MQTT client needs and what it must not get, read from server/mqtt.go of v2.9.10:
 * - a QoS 1 subscription is a JetStream consumer whose deliveries arrive on `$MQTT.sub.<nuid>`, and the server
 *   subscribes the client to it under the client's own permissions: each user may subscribe `$MQTT.sub.>`. An MQTT
 *   SUBSCRIBE whose subject starts with `$MQTT.sub.` is refused by `mqttProcessSubs`, so no MQTT client can read
 *   another's deliveries through it; a plain NATS client could, so every user is limited to MQTT connections
 *   (`allowed_connection_types: ["MQTT"]`).
 * - the JetStream API calls behind sessions, retained messages and QoS 1 are made by the account's internal client,
 *   not under the user's permissions: nothing else is granted.
 *
 * Revoked ids stay in the user list as tombstones: the same rights, and a password nobody holds. Removing the user
 * instead makes a reload delete the retained messages it published (its agent status) on every node, and a node
 * that has already heard of that deletion from another node panics in `mqttCheckPubRetainedPerms` (a nil
 * subscription removed from the retained-message sublist; seen with 2.9.10 here, the code is the same up to 2.9.25).
 * A tombstone's connections still close on reload: the server checks each connected client's password again.
 */
import { createHash, randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { isValidId, MeshError, type Role, roleOfId } from '@edge-mesh/protocol';
import bcrypt from 'bcryptjs';
import { type MosquittoIdentity, mosquittoAclRules } from './mosquitto.ts';
import { checkIdentities, keptSecret, putFile, removeUnlisted, SECRET_SUFFIX, secretOf, secretsFolder } from './secret-files.ts';

/** The account every mesh user lives in: MQTT sessions and retained messages are per account. */
export const NATS_MESH_ACCOUNT = 'MESH';
/** Delivery subjects of QoS 1 subscriptions (server/mqtt.go, `mqttSubPrefix`). */
export const NATS_MQTT_DELIVERY = '$MQTT.sub.>';
/**
 * bcrypt cost, the least Go's bcrypt takes. The secrets are 256 random bits, so no cost makes guessing one from a
 * leaked hash feasible or not; what the cost does change is the server's CPU: nats-server checks the hash on every
 * CONNECT and, on every reload, once more for each connected client (server/reload.go, `isClientAuthorized`).
 */
export const NATS_BCRYPT_COST = 4;

/** An MQTT topic or filter as the NATS subject its MQTT layer maps it to; MESH_CONFIG for what NATS cannot map. */
export function natsSubject(topic: string): string {
  if (topic === '' || /[. \t\r\n]/.test(topic))
    throw new MeshError('MESH_CONFIG', `MQTT topic ${JSON.stringify(topic)} cannot be a NATS subject (no '.', spaces or empty topics)`);
  const levels = topic.split('/');
  if (levels.some((l) => l === ''))
    throw new MeshError('MESH_CONFIG', `MQTT topic ${JSON.stringify(topic)} has an empty level (NATS maps those specially)`);
  return levels.map((l) => (l === '+' ? '*' : l === '#' ? '>' : l)).join('.');
}

export interface NatsPermissions {
  publish: string[];
  subscribe: string[];
}

/** What `id` with `role` may publish and subscribe, as NATS subjects (broker/src/mosquitto.ts's rules, translated). */
export function natsPermissions(role: Role, id: string): NatsPermissions {
  const publish: string[] = [];
  const subscribe: string[] = [NATS_MQTT_DELIVERY];
  for (const rule of mosquittoAclRules(role, id)) (rule.access === 'write' ? publish : subscribe).push(natsSubject(rule.topic));
  return { publish, subscribe };
}

const q = (s: string) => JSON.stringify(s);

/** The `accounts` block: one account with JetStream, one user per identity, MQTT connections only. */
export function natsAccountsConf(users: readonly { id: string; role: Role; hash: string; revoked?: boolean }[]): string {
  const lines = [
    '# Generated by `edge-mesh auth nats` (docs/operations.md, "Running on a NATS cluster"): one user per admitted id.',
    'accounts {',
    `  ${NATS_MESH_ACCOUNT} {`,
    '    jetstream: enabled',
    '    users: [',
  ];
  for (const { id, role, hash, revoked } of users) {
    const p = natsPermissions(role, id);
    lines.push(
      `      # ${role}${revoked ? ', revoked: a tombstone nobody can log in as' : ''}`,
      `      { user: ${q(id)}, password: ${q(hash)}, allowed_connection_types: ["MQTT"],`,
      `        permissions: { publish: { allow: [${p.publish.map(q).join(', ')}] }, subscribe: { allow: [${p.subscribe.map(q).join(', ')}] } } }`,
    );
  }
  lines.push('    ]', '  }', '}', '');
  return lines.join('\n');
}

export interface NatsNode {
  /** server_name, unique in the cluster. */
  name: string;
  host: string;
  /** MQTT listener. */
  mqttPort: number;
  /** NATS client listener (no mesh user may use it: allowed_connection_types). */
  clientPort: number;
  clusterPort: number;
}

export interface NatsClusterOptions {
  nodes: readonly NatsNode[];
  clusterName?: string;
  /** Replicas of the MQTT streams (sessions, messages, retained); default min(3, nodes). */
  streamReplicas?: number;
  /** Folder holding each node's JetStream store as `{name}/jetstream` (default: the output folder). */
  storeDir?: string;
  /** Largest message, bytes (default the embedded broker's 4 MiB + 64 KiB, broker/src/options.ts). */
  maxPayloadBytes?: number;
}

/** One node's configuration; `routeSecret` authenticates the routes between the nodes. */
export function natsNodeConf(node: NatsNode, o: NatsClusterOptions & { storeDir: string; routeSecret: string; pidFile: string }): string {
  const replicas = o.streamReplicas ?? Math.min(3, o.nodes.length);
  const routes = o.nodes
    .filter((n) => n.name !== node.name)
    .map((n) => `nats-route://route:${encodeURIComponent(o.routeSecret)}@${n.host}:${n.clusterPort}`);
  const lines = [
    '# Generated by `edge-mesh auth nats` (docs/operations.md, "Running on a NATS cluster").',
    `server_name: ${q(node.name)}`,
    // NATS 2.9 takes host:port here (a bare address is refused).
    `listen: ${q(`${node.host}:${node.clientPort}`)}`,
    `pid_file: ${q(o.pidFile)}`,
    `max_payload: ${o.maxPayloadBytes ?? 4_259_840}`,
    `jetstream { store_dir: ${q(path.join(o.storeDir, node.name, 'jetstream'))} }`,
  ];
  if (o.nodes.length > 1) {
    lines.push(
      'cluster {',
      `  name: ${q(o.clusterName ?? 'mesh')}`,
      `  listen: ${q(`${node.host}:${node.clusterPort}`)}`,
      `  authorization { user: "route", password: ${q(o.routeSecret)} }`,
      `  routes: [${routes.map(q).join(', ')}]`,
      '}',
    );
  }
  lines.push(
    'mqtt {',
    `  listen: ${q(`${node.host}:${node.mqttPort}`)}`,
    `  stream_replicas: ${replicas}`,
    '}',
    // Resolved next to this file (nats-server reads includes relative to the including file).
    'include ./accounts.conf',
    '',
  );
  return lines.join('\n');
}

export interface NatsAuthFiles {
  accountsFile: string;
  /** Ids admitted before and not now: kept as users nobody can log in as (see the header). */
  revoked: string[];
  /** One configuration per node, in the order given. */
  nodeConfs: { name: string; conf: string; pidFile: string; mqttUrl: string }[];
  /** id -> the file holding its password (mode 0600), for `--username ID --password-file FILE`. */
  secrets: Map<string, string>;
  /** Secret files of identities no longer listed, deleted by this run. */
  removed: string[];
}

const HASH_SUFFIX = '.bcrypt';

/**
 * The secret of `id` (kept when one exists, so a regeneration logs nobody else out) and its bcrypt hash. The hash is
 * cached beside the secret with the secret's SHA-256, so regenerating after a revocation costs no bcrypt per id.
 */
async function secretAndHash(secretsDir: string, id: string): Promise<{ file: string; hash: string }> {
  const { file, password } = await secretOf(secretsDir, id);
  const hashFile = path.join(secretsDir, `${id}${HASH_SUFFIX}`);
  const digest = createHash('sha256').update(password).digest('hex');
  try {
    const [cachedDigest, cachedHash] = (await readFile(hashFile, 'utf8')).trim().split(' ');
    if (cachedDigest === digest && cachedHash?.startsWith('$2')) return { file, hash: cachedHash };
  } catch {}
  const hash = bcrypt.hashSync(password, NATS_BCRYPT_COST);
  await putFile(hashFile, `${digest} ${hash}\n`, 0o600);
  return { file, hash };
}

/**
 * Writes `accounts.conf`, `{node}.conf` per node, `route.secret`, `users.json` (who was admitted, who revoked) and
 * `secrets/{id}.password` under `outDir`. Every file holding a secret or a hash is 0600. After a revocation, run it
 * again without the id and reload every node (SIGHUP or `nats-server --signal reload=PID`): each node checks every
 * connected client's password again and closes those that fail (server/reload.go, `reloadAuthorization`).
 */
export async function writeNatsAuth(
  outDir: string,
  identities: readonly MosquittoIdentity[],
  cluster: NatsClusterOptions,
): Promise<NatsAuthFiles> {
  const seen = checkIdentities(identities);
  if (cluster.nodes.length === 0) throw new MeshError('MESH_CONFIG', 'a NATS cluster needs at least one node');
  const names = new Set(cluster.nodes.map((n) => n.name));
  if (names.size !== cluster.nodes.length) throw new MeshError('MESH_CONFIG', 'node names must differ');
  for (const n of cluster.nodes)
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(n.name)) throw new MeshError('MESH_CONFIG', `node name ${JSON.stringify(n.name)}: use [A-Za-z0-9_-]`);
  const replicas = cluster.streamReplicas ?? Math.min(3, cluster.nodes.length);
  if (!Number.isInteger(replicas) || replicas < 1 || replicas > Math.min(5, cluster.nodes.length))
    throw new MeshError('MESH_CONFIG', `stream replicas must be 1..${Math.min(5, cluster.nodes.length)} (the node count, at most 5)`);

  const dir = path.resolve(outDir);
  const secretsDir = await secretsFolder(dir);
  const secrets = new Map<string, string>();
  const users: { id: string; role: Role; hash: string; revoked?: boolean }[] = [];
  for (const { id, role } of identities) {
    const { file, hash } = await secretAndHash(secretsDir, id);
    secrets.set(id, file);
    users.push({ id, role, hash });
  }
  // Ids admitted by an earlier run and not now become tombstones, for good (see the header).
  const stateFile = path.join(dir, 'users.json');
  let state: { admitted: MosquittoIdentity[]; revoked: MosquittoIdentity[] } = { admitted: [], revoked: [] };
  try {
    state = JSON.parse(await readFile(stateFile, 'utf8')) as typeof state;
  } catch {}
  const revoked = new Map<string, MosquittoIdentity>();
  for (const r of [...(state.revoked ?? []), ...(state.admitted ?? [])])
    if (!seen.has(r.id) && isValidId(r.id) && roleOfId(r.id) === r.role) revoked.set(r.id, { id: r.id, role: r.role });
  for (const { id, role } of revoked.values())
    users.push({ id, role, hash: bcrypt.hashSync(randomBytes(32).toString('base64url'), NATS_BCRYPT_COST), revoked: true });
  await putFile(
    stateFile,
    `${JSON.stringify({ admitted: identities.map(({ id, role }) => ({ id, role })), revoked: [...revoked.values()] }, null, 1)}\n`,
    0o600,
  );

  const removed = await removeUnlisted(secretsDir, seen, [SECRET_SUFFIX, HASH_SUFFIX]);

  // The routes' shared secret: kept across runs, since changing it would need every node restarted together.
  const routeSecret = await keptSecret(path.join(dir, 'route.secret'));

  const accountsFile = path.join(dir, 'accounts.conf');
  await putFile(accountsFile, natsAccountsConf(users), 0o600);
  const storeDir = path.resolve(cluster.storeDir ?? dir);
  const nodeConfs: NatsAuthFiles['nodeConfs'] = [];
  for (const node of cluster.nodes) {
    const conf = path.join(dir, `${node.name}.conf`);
    const pidFile = path.join(dir, `${node.name}.pid`);
    await putFile(conf, natsNodeConf(node, { ...cluster, streamReplicas: replicas, storeDir, routeSecret, pidFile }), 0o600);
    nodeConfs.push({
      name: node.name,
      conf,
      pidFile,
      mqttUrl: `mqtt://${node.host.includes(':') ? `[${node.host}]` : node.host}:${node.mqttPort}`,
    });
  }
  return { accountsFile, revoked: [...revoked.keys()], nodeConfs, secrets, removed };
}

/**
 * Signals every node whose pid file holds a live process to reload its configuration (SIGHUP, what
 * `nats-server --signal reload=PID` sends). Returns the pids signalled and the nodes not running here.
 */
export async function reloadNatsNodes(pidFiles: readonly string[]): Promise<{ reloaded: number[]; notRunning: string[] }> {
  const reloaded: number[] = [];
  const notRunning: string[] = [];
  for (const file of pidFiles) {
    let pid = Number.NaN;
    try {
      pid = Number((await readFile(file, 'utf8')).trim());
    } catch {}
    try {
      if (!Number.isInteger(pid) || pid <= 1) throw new MeshError('MESH_NOT_FOUND', `no pid in ${file}`);
      process.kill(pid, 'SIGHUP');
      reloaded.push(pid);
    } catch {
      notRunning.push(file);
    }
  }
  return { reloaded, notRunning };
}
