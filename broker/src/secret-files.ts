/**
 * The generated credentials folder shared by `edge-mesh auth mosquitto` and `edge-mesh auth nats`: the identities
 * checked, one secret file per id under `secrets/` (kept across runs, so regenerating logs nobody else out), files
 * written aside and renamed (an engine reloading never reads half a file), and the files of ids no longer listed
 * deleted.
 */
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { isValidId, MeshError, type Role, roleOfId } from '@edge-mesh/protocol';

export const SECRET_SUFFIX = '.password';

/** Every identity is a mesh id of its role, listed once: MESH_CONFIG otherwise. Returns the ids. */
export function checkIdentities(identities: readonly { id: string; role: Role }[]): Set<string> {
  const seen = new Set<string>();
  for (const { id, role } of identities) {
    if (!isValidId(id) || roleOfId(id) !== role)
      throw new MeshError('MESH_CONFIG', `${JSON.stringify(id)} is not a mesh id of role ${role}`);
    if (seen.has(id)) throw new MeshError('MESH_CONFIG', `${id} is listed twice`);
    seen.add(id);
  }
  return seen;
}

/** `dir/secrets`, created with mode 0700 when missing. */
export async function secretsFolder(dir: string): Promise<string> {
  const secretsDir = path.join(dir, 'secrets');
  try {
    await mkdir(secretsDir, { recursive: true, mode: 0o700 });
  } catch (cause) {
    throw new MeshError('MESH_CONFIG', `cannot create ${secretsDir}: ${(cause as Error).message}`, { cause });
  }
  return secretsDir;
}

/** Writes `file` with `mode` under a temporary name, then renames it into place. */
export async function putFile(file: string, text: string, mode: number): Promise<void> {
  const tmp = `${file}.${process.pid}.tmp`;
  await writeFile(tmp, text, { mode });
  await chmod(tmp, mode);
  await rename(tmp, file);
}

/** The secret in `file` when it has 32 characters or more, else 256 fresh random bits written there; the file is 0600. */
export async function keptSecret(file: string): Promise<string> {
  let secret = '';
  try {
    secret = (await readFile(file, 'utf8')).trim();
  } catch {}
  if (secret.length < 32) {
    secret = randomBytes(32).toString('base64url');
    await putFile(file, `${secret}\n`, 0o600);
  }
  await chmod(file, 0o600);
  return secret;
}

/** The secret of `id` under `secretsDir` (see `keptSecret`) and its file. */
export async function secretOf(secretsDir: string, id: string): Promise<{ file: string; password: string }> {
  const file = path.join(secretsDir, `${id}${SECRET_SUFFIX}`);
  return { file, password: await keptSecret(file) };
}

/**
 * Deletes the files in `secretsDir` named `{id}{suffix}` for one of `suffixes` whose id is not in `listed`, and
 * returns the secret files among them.
 */
export async function removeUnlisted(
  secretsDir: string,
  listed: Set<string>,
  suffixes: readonly string[] = [SECRET_SUFFIX],
): Promise<string[]> {
  const removed: string[] = [];
  for (const name of await readdir(secretsDir)) {
    const suffix = suffixes.find((s) => name.endsWith(s));
    if (!suffix || listed.has(name.slice(0, -suffix.length))) continue;
    await rm(path.join(secretsDir, name), { force: true });
    if (suffix === SECRET_SUFFIX) removed.push(path.join(secretsDir, name));
  }
  return removed;
}
