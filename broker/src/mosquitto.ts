/**
 * The mesh's identities and topic rights for mosquitto 2.0 as an external broker (docs/operations.md, "Running on
 * mosquitto"; docs/security.md, "Authorization on mosquitto"): a password file, an ACL file, one secret file per
 * identity and a configuration to include.
 *
 * Password entries follow mosquitto 2.0's own format, `user:$7$ITER$SALT$HASH` with PBKDF2-HMAC-SHA512, 101
 * iterations, a 12-byte salt and a 64-byte hash, both base64 (as eclipse/mosquitto's
 * `apps/mosquitto_passwd/mosquitto_passwd.c` writes them and `src/password_mosq.c` checks them); they are made here
 * with node:crypto, and test/mosquitto.test.ts checks them against `mosquitto_passwd` and a running mosquitto.
 *
 * The ACL file has one `user` section per identity with that identity's id spelt out. mosquitto's `pattern` lines
 * (with %u or %c) apply to every user whatever its role, and every right the mesh grants depends on the role
 * (broker/src/acl.ts): `pattern write mesh/v1/agent/%u/status` would let an app publish a status under its own app id.
 * Spelling each id out grants each identity exactly its role's rights and nothing to anyone else.
 */
import { pbkdf2Sync, randomBytes, timingSafeEqual } from 'node:crypto';
import path from 'node:path';
import { deriveId, isValidId, MeshError, type Role, roleOfId, topics } from '@edge-mesh/protocol';
import type { Logger } from 'pino';
import { checkIdentities, putFile, removeUnlisted, secretOf, secretsFolder } from './secret-files.ts';
import { AdmissionStore } from './store.ts';

/** mosquitto 2.0's `$7$` parameters (PW_DEFAULT_ITERATIONS, SALT_LEN and the SHA-512 digest length). */
export const MOSQUITTO_PBKDF2_ITERATIONS = 101;
const SALT_BYTES = 12;
const HASH_BYTES = 64;

/** A `$7$` (PBKDF2-SHA512) hash as mosquitto_passwd writes it, without the `user:` prefix. */
export function mosquittoPasswordHash(
  password: string,
  salt: Buffer = randomBytes(SALT_BYTES),
  iterations = MOSQUITTO_PBKDF2_ITERATIONS,
): string {
  const hash = pbkdf2Sync(password, salt, iterations, HASH_BYTES, 'sha512');
  return `$7$${iterations}$${salt.toString('base64')}$${hash.toString('base64')}`;
}

/** Checks `password` against a `$7$` hash (mosquitto's format); false for anything else. */
export function verifyMosquittoPassword(entry: string, password: string): boolean {
  const m = /^\$7\$(\d{1,7})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$/.exec(entry);
  if (!m) return false;
  const iterations = Number(m[1]);
  if (iterations < 1) return false;
  const expected = Buffer.from(m[3]!, 'base64');
  const got = pbkdf2Sync(password, Buffer.from(m[2]!, 'base64'), iterations, expected.byteLength, 'sha512');
  return expected.byteLength > 0 && timingSafeEqual(expected, got);
}

export interface MosquittoAclRule {
  access: 'read' | 'write';
  topic: string;
}

/** Device topics any non-agent may read (acl.ts lets apps, routers, bridges and operators subscribe to them). */
const DEVICE_READ: MosquittoAclRule[] = [
  { access: 'read', topic: topics.allDeviceAvailability() },
  { access: 'read', topic: topics.allDeviceTelemetry() },
];

/**
 * The topic rights of `id` with `role`, the same table as broker/src/acl.ts. What mosquitto's ACLs cannot say is
 * listed in docs/security.md ("Authorization on mosquitto"): retain flags, the sender-id form of the `+` levels.
 */
export function mosquittoAclRules(role: Role, id: string): MosquittoAclRule[] {
  const w = (topic: string): MosquittoAclRule => ({ access: 'write', topic });
  const r = (topic: string): MosquittoAclRule => ({ access: 'read', topic });
  switch (role) {
    case 'agent':
      return [
        w(topics.agentStatus(id)),
        w(topics.agentLoad(id)),
        w(topics.clientReply('+', id)),
        r(topics.agentRequestsFor(id)),
        r(topics.agentCancelsFor(id)),
        r(topics.agentVouchersFor(id)),
        r(topics.allDiscover()),
      ];
    case 'app':
    case 'router':
    case 'bridge': {
      const rules = [
        w(topics.agentRequest('+', id)),
        w(topics.agentCancel('+', id)),
        w(topics.agentVoucher('+', id)),
        w(topics.routerRoute('+', id)),
        w(topics.discover(id)),
        r(topics.clientRepliesFor(id)),
        r(topics.clientLeasesFor(id)),
        r(topics.allAgentStatus()),
        r(topics.allAgentLoad()),
        ...DEVICE_READ,
      ];
      if (role === 'router') rules.push(w(topics.clientLease('+', id)), r(topics.routerRoutesFor(id)));
      if (role === 'bridge') rules.push(w(topics.deviceAvailability(id, '+')), w(topics.deviceTelemetry(id, '+')));
      return rules;
    }
    case 'operator':
      // Admin records need the embedded broker to apply them: on mosquitto an operator only watches the fleet.
      return [w(topics.discover(id)), r(topics.allAgentStatus()), r(topics.allAgentLoad()), ...DEVICE_READ];
    default:
      return [];
  }
}

/** An identity to let in: its id and role (the id must carry the role's prefix). */
export interface MosquittoIdentity {
  id: string;
  role: Role;
}

/** Checks a public identity (`edge-mesh keys show` output): the id must derive from the key and role. */
export function mosquittoIdentityOf(value: unknown, where: string): MosquittoIdentity {
  const v = value as { id?: unknown; role?: unknown; publicKey?: unknown } | null;
  if (v === null || typeof v !== 'object' || typeof v.id !== 'string' || typeof v.role !== 'string' || typeof v.publicKey !== 'string')
    throw new MeshError('MESH_CONFIG', `${where}: not a public identity ({id, role, publicKey})`);
  const key = /^[A-Za-z0-9_-]{43}=?$/.test(v.publicKey) ? Buffer.from(v.publicKey, 'base64url') : Buffer.alloc(0);
  if (key.byteLength !== 32) throw new MeshError('MESH_CONFIG', `${where}: publicKey is not a base64url Ed25519 key`);
  if (!isValidId(v.id) || roleOfId(v.id) !== v.role || deriveId(v.role as Role, new Uint8Array(key)) !== v.id)
    throw new MeshError('MESH_CONFIG', `${where}: id ${JSON.stringify(v.id.slice(0, 80))} does not derive from its role and key`);
  return { id: v.id, role: v.role as Role };
}

/** The ACL file: no rights for anonymous clients, then one `user` section per identity. */
export function mosquittoAclFile(identities: readonly MosquittoIdentity[]): string {
  const lines = ["# Generated by `edge-mesh auth mosquitto`: each identity gets its role's rights (docs/security.md).", ''];
  for (const { id, role } of identities) {
    lines.push(`# ${role}`, `user ${id}`);
    for (const rule of mosquittoAclRules(role, id)) lines.push(`topic ${rule.access} ${rule.topic}`);
    lines.push('');
  }
  return lines.join('\n');
}

export interface MosquittoConfOptions {
  port: number;
  host?: string;
  passwordFile: string;
  aclFile: string;
}

/**
 * A mosquitto.conf for the mesh. `set_tcp_nodelay true`: without it a QoS 1 round trip waits on delayed ACKs
 * (44 ms here, docs/operations.md). `use_username_as_clientid true`: the client id becomes the authenticated
 * username, so nobody can take over (and disconnect) another identity's session by reusing its client id.
 */
export function mosquittoConf(o: MosquittoConfOptions): string {
  return [
    '# Generated by `edge-mesh auth mosquitto` (docs/operations.md, "Running on mosquitto").',
    'per_listener_settings false',
    `listener ${o.port}${o.host ? ` ${o.host}` : ''}`,
    'allow_anonymous false',
    `password_file ${o.passwordFile}`,
    `acl_file ${o.aclFile}`,
    'use_username_as_clientid true',
    'set_tcp_nodelay true',
    // The default of 1000 dropped QoS 1 messages to a busy subscriber (FACTS); agents keep their own queue bound.
    'max_queued_messages 10000',
    // The embedded broker's default largest packet (broker/src/options.ts, maxPacketBytes): 4 MiB + 64 KiB.
    'max_packet_size 4259840',
    'persistence false',
    '',
  ].join('\n');
}

export interface MosquittoAuthFiles {
  passwordFile: string;
  aclFile: string;
  confFile: string;
  /** id -> the file holding its password (mode 0600), for `--username ID --password-file FILE`. */
  secrets: Map<string, string>;
  /** Secret files of identities no longer listed, deleted by this run. */
  removed: string[];
}

/**
 * Writes `passwd`, `acl`, `mosquitto.conf` and `secrets/{id}.password` under `outDir`. A secret that already exists
 * for a listed id is kept (regenerating after a revocation does not change anyone else's password); the secrets of
 * ids no longer listed are deleted. Files are written to a temporary name and renamed, so a SIGHUP never reads half
 * a file.
 */
export async function writeMosquittoAuth(
  outDir: string,
  identities: readonly MosquittoIdentity[],
  conf: Omit<MosquittoConfOptions, 'passwordFile' | 'aclFile'>,
): Promise<MosquittoAuthFiles> {
  const seen = checkIdentities(identities);
  const dir = path.resolve(outDir);
  const secretsDir = await secretsFolder(dir);
  const secrets = new Map<string, string>();
  const entries: string[] = [];
  for (const { id } of identities) {
    const { file, password } = await secretOf(secretsDir, id);
    secrets.set(id, file);
    entries.push(`${id}:${mosquittoPasswordHash(password)}`);
  }
  const removed = await removeUnlisted(secretsDir, seen);
  const passwordFile = path.join(dir, 'passwd');
  const aclFile = path.join(dir, 'acl');
  const confFile = path.join(dir, 'mosquitto.conf');
  await putFile(passwordFile, entries.length ? `${entries.join('\n')}\n` : '', 0o600);
  await putFile(aclFile, mosquittoAclFile(identities), 0o644);
  await putFile(confFile, mosquittoConf({ ...conf, passwordFile, aclFile }), 0o644);
  return { passwordFile, aclFile, confFile, secrets, removed };
}

/**
 * The identities admitted now in an embedded broker's admission store (`edge-mesh broker --data DIR`): admitted, not
 * revoked, not expired, each record checked again against `trusted`. The store must not be open in a running broker.
 */
export async function admittedInStore(
  dataDir: string,
  trusted: ReadonlyMap<string, Uint8Array>,
  log: Logger,
  nowMs = Date.now(),
): Promise<MosquittoIdentity[]> {
  const store = await AdmissionStore.open(dataDir, trusted, log);
  try {
    return store.admissions(nowMs).map((a) => ({ id: a.id, role: a.role }));
  } finally {
    await store.close();
  }
}
