/**
 * `edge-mesh auth mosquitto` (docs/cli.md; docs/operations.md, "Running on mosquitto"): the mesh's admitted
 * identities as a mosquitto 2.0 password file, ACL file and configuration, and one password file per identity for
 * its `--username ID --password-file FILE`. The file formats are written by the broker package
 * (broker/src/mosquitto.ts).
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { MosquittoIdentity } from '@edge-mesh/broker';
import { parseOperatorSpec } from '@edge-mesh/client';
import { MeshError } from '@edge-mesh/protocol';
import type { Command } from 'commander';
import { registerRabbitmqAuth } from './auth-rabbitmq.ts';
import { cliLogger } from './log.ts';
import { collect, positiveInt } from './options.ts';

/** The public identities in a file: a key file, `keys show` output, or a JSON array of `keys show` outputs. */
async function identitiesInFile(file: string): Promise<unknown[]> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (cause) {
    throw new MeshError('MESH_CONFIG', `cannot read --identity ${file}: ${(cause as NodeJS.ErrnoException).code ?? cause}`, { cause });
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new MeshError('MESH_CONFIG', `--identity ${file} is not JSON (a key file, \`keys show\` output, or a list of them)`);
  }
  const items = Array.isArray(parsed) ? parsed : [parsed];
  const out: unknown[] = [];
  for (const item of items) {
    if (item !== null && typeof item === 'object' && 'seed' in item) {
      // A key file: only its public half is used (the secret never leaves the file).
      const { loadKeyFile } = await import('@edge-mesh/client');
      const { publicIdentity } = await import('@edge-mesh/protocol');
      out.push(publicIdentity(await loadKeyFile(file)));
    } else out.push(item);
  }
  return out;
}

/**
 * The identities to let in, from `--identity FILE` (repeatable) and an embedded broker's admission store
 * (`--data DIR` with `--operator KEY`); MESH_CONFIG when there is nobody. Shared by every `auth` engine.
 */
export async function admittedIdentities(opts: { identity: string[]; data?: string; operator: string[] }): Promise<MosquittoIdentity[]> {
  const { admittedInStore, mosquittoIdentityOf } = await import('@edge-mesh/broker');
  const identities: MosquittoIdentity[] = [];
  for (const file of opts.identity) for (const item of await identitiesInFile(file)) identities.push(mosquittoIdentityOf(item, file));
  if (opts.data !== undefined) {
    if (opts.operator.length === 0) throw new MeshError('MESH_CONFIG', '--data needs the --operator keys whose admissions it trusts');
    const trusted = new Map<string, Uint8Array>();
    for (const spec of opts.operator) {
      const op = await parseOperatorSpec(spec);
      trusted.set(op.id, op.publicKey);
    }
    for (const a of await admittedInStore(path.resolve(opts.data), trusted, cliLogger('warn')))
      if (!identities.some((i) => i.id === a.id)) identities.push(a);
  } else if (opts.operator.length > 0) throw new MeshError('MESH_CONFIG', '--operator is only read with --data');
  if (identities.length === 0) throw new MeshError('MESH_CONFIG', 'nobody to admit: give --identity FILE or --data DIR with --operator');
  return identities;
}

export function registerAuthCommands(program: Command): void {
  const auth = program.command('auth').description("give an external MQTT broker the mesh's identities and topic rights");
  auth
    .command('mosquitto')
    .description(
      'write a mosquitto 2.0 password file, ACL file and mosquitto.conf for the admitted identities, and a password file (0600) per identity; after a revocation run it again and send mosquitto SIGHUP',
    )
    .requiredOption('--out <dir>', 'folder to write passwd, acl, mosquitto.conf and secrets/{id}.password into')
    .option('--identity <file>', 'an identity to admit: key file, `keys show` output, or a JSON list of them (repeatable)', collect, [])
    .option(
      '--data <dir>',
      "an embedded broker's admission store (`edge-mesh broker --data`): admit what it admits (the broker must be stopped)",
    )
    .option('--operator <key>', 'with --data: a trusted operator, as for `edge-mesh broker --operator` (repeatable)', collect, [])
    .option('--port <port>', 'the listener port written into mosquitto.conf', positiveInt, 1883)
    .option('--host <host>', 'the listener address written into mosquitto.conf', '127.0.0.1')
    .action(async (opts: { out: string; identity: string[]; data?: string; operator: string[]; port: number; host: string }) => {
      const { writeMosquittoAuth } = await import('@edge-mesh/broker');
      const identities = await admittedIdentities(opts);
      const files = await writeMosquittoAuth(opts.out, identities, { port: opts.port, host: opts.host });
      process.stdout.write(
        `${JSON.stringify({
          conf: files.confFile,
          passwordFile: files.passwordFile,
          aclFile: files.aclFile,
          identities: identities.map((i) => ({ id: i.id, role: i.role, passwordFile: files.secrets.get(i.id) })),
          removed: files.removed,
        })}\n`,
      );
    });
  registerRabbitmqAuth(auth);
}
