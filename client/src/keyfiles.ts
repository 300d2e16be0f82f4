/**
 * Key files on disk for the CLI: written with mode 0600 (never over an existing file unless asked),
 * read with a warning when others may read them. A key file's content is never logged or printed;
 * only its public identity is.
 */
import { chmod, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import {
  deriveId,
  encodeKeyFile,
  generateIdentity,
  type Identity,
  isRole,
  MeshError,
  parseKeyFile,
  ROLES,
  type Role,
} from '@edge-mesh/protocol';

export interface KeyWarnings {
  warn: (message: string) => void;
}

/** Reads and checks a key file; warns (path only) when its mode lets group or others read it. */
export async function loadKeyFile(file: string, expectedRole?: Role | readonly Role[], out?: KeyWarnings): Promise<Identity> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new MeshError('MESH_CONFIG', `cannot read key file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, {
      cause: err,
    });
  }
  const identity = parseKeyFile(text, `key file ${file}`);
  const roles = expectedRole === undefined ? undefined : typeof expectedRole === 'string' ? [expectedRole] : expectedRole;
  if (roles && !roles.includes(identity.role)) {
    throw new MeshError('MESH_CONFIG', `key file ${file} holds a key of role ${identity.role}; this needs role ${roles.join(' or ')}`);
  }
  if (process.platform !== 'win32') {
    const { mode } = await stat(file);
    if (mode & 0o077) out?.warn(`key file ${file} can be read by other users (mode ${(mode & 0o777).toString(8)}); run chmod 600 ${file}`);
  }
  return identity;
}

/** Writes a key file with mode 0600; refuses to replace an existing file unless `force`. */
export async function writeKeyFile(file: string, identity: Identity, { force = false } = {}): Promise<void> {
  await mkdir(path.dirname(path.resolve(file)), { recursive: true, mode: 0o700 });
  try {
    await writeFile(file, encodeKeyFile(identity), { mode: 0o600, flag: force ? 'w' : 'wx' });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new MeshError('MESH_CONFIG', `${file} exists; refusing to overwrite a key file (use --force to replace it)`, { cause: err });
    }
    throw err;
  }
  // `mode` only applies when the file is created; a forced overwrite keeps the old mode otherwise.
  await chmod(file, 0o600);
}

/** Loads the key file of `role` at `file`, creating it (0600) on first use. */
export async function ensureKeyFile(file: string, role: Role, out?: KeyWarnings): Promise<Identity> {
  try {
    await stat(file);
  } catch {
    const identity = generateIdentity(role);
    try {
      await writeKeyFile(file, identity);
      return identity;
    } catch (err) {
      // Someone else created it in between: read theirs.
      if (!(err instanceof MeshError)) throw err;
    }
  }
  return loadKeyFile(file, role, out);
}

export function parseRole(value: string): Role {
  if (!isRole(value)) throw new MeshError('MESH_CONFIG', `role must be one of ${ROLES.join(', ')}, got ${JSON.stringify(value)}`);
  return value;
}

/** A raw 32-byte Ed25519 public key written in base64url (the form `keys show` prints). */
export function parsePublicKey(value: string): Uint8Array {
  const bytes = /^[A-Za-z0-9_-]{43}=?$/.test(value) ? Buffer.from(value, 'base64url') : Buffer.alloc(0);
  if (bytes.byteLength !== 32)
    throw new MeshError('MESH_CONFIG', `${JSON.stringify(value.slice(0, 64))} is not a base64url Ed25519 public key (32 bytes)`);
  return new Uint8Array(bytes);
}

export interface TrustedOperator {
  id: string;
  publicKey: Uint8Array;
}

/**
 * A trusted operator for the broker: an operator key file, a file with its public identity
 * (`edge-mesh keys show` output, so the broker host needs no secret), or its base64url public key.
 */
export async function parseOperatorSpec(spec: string, out?: KeyWarnings): Promise<TrustedOperator> {
  let text: string | undefined;
  try {
    text = await readFile(spec, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'ENOENT' && code !== 'ENAMETOOLONG')
      throw new MeshError('MESH_CONFIG', `cannot read operator key ${spec}: ${code}`, { cause: err });
  }
  if (text === undefined) {
    if (spec.includes('/') || spec.endsWith('.key') || spec.endsWith('.json'))
      throw new MeshError('MESH_CONFIG', `operator key file ${spec} does not exist`);
    const publicKey = parsePublicKey(spec);
    return { id: deriveId('operator', publicKey), publicKey };
  }
  let parsed: { role?: unknown; id?: unknown; publicKey?: unknown; seed?: unknown };
  try {
    parsed = JSON.parse(text) as typeof parsed;
  } catch {
    throw new MeshError('MESH_CONFIG', `${spec} is neither a key file nor a public identity (not JSON)`);
  }
  if (parsed !== null && typeof parsed === 'object' && 'seed' in parsed) {
    const identity = await loadKeyFile(spec, 'operator', out);
    return { id: identity.id, publicKey: identity.publicKey };
  }
  if (parsed?.role !== 'operator' || typeof parsed.publicKey !== 'string') {
    throw new MeshError('MESH_CONFIG', `${spec} is not an operator's key file or public identity`);
  }
  const publicKey = parsePublicKey(parsed.publicKey);
  const id = deriveId('operator', publicKey);
  if (parsed.id !== undefined && parsed.id !== id)
    throw new MeshError('MESH_CONFIG', `${spec}: id ${String(parsed.id)} does not derive from its public key`);
  return { id, publicKey };
}
