/** Option parsers shared by the commands: a bad value fails with commander's message and a non-zero exit. */
import { readFile } from 'node:fs/promises';
import { BROKER_ENGINES, type BrokerEngine, engineDefaults, loadTlsFiles, type MeshTlsOptions } from '@edge-mesh/client';
import { MeshError } from '@edge-mesh/protocol';
import { type Command, InvalidArgumentError, Option } from 'commander';

export function positiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError('must be a positive integer');
  return n;
}

export function nonNegativeInt(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError('must be a non-negative integer');
  return n;
}

export function positiveNumber(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError('must be a positive number');
  return n;
}

export function nonNegativeNumber(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n < 0) throw new InvalidArgumentError('must be a number, 0 or more');
  return n;
}

/** A depth for the escrow's events (docs/settlement.md, "Reorgs"): a whole number of blocks, `safe` or `finalized`. */
export function confirmationsArg(value: string): number | 'safe' | 'finalized' {
  if (value === 'safe' || value === 'finalized') return value;
  const n = Number(value);
  if (value.trim() === '' || !Number.isSafeInteger(n) || n < 0)
    throw new InvalidArgumentError('must be a number of blocks (0 or more), safe or finalized');
  return n;
}

export const collect = (value: string, previous: string[]) => [...previous, value];

/**
 * The flags every command that connects to the broker takes (docs/cli.md, "Connecting"): TLS files and, for an
 * external broker that checks passwords, a username and a password file (a file, so the password is not in `ps`).
 */
export function brokerAccessFlags(command: Command): Command {
  return command
    .option('--tls-ca <file>', "PEM CA certificate(s) that sign the broker's certificate (mqtts:// URLs)")
    .option('--tls-cert <file>', 'PEM client certificate, for a broker that asks for one (mutual TLS); with --tls-key')
    .option('--tls-key <file>', 'PEM private key of --tls-cert')
    .option('--username <name>', 'username for an external broker that checks passwords (with --password-file)')
    .option('--password-file <file>', "file holding the broker password; sent on every reconnect instead of the key's token")
    .addOption(
      new Option('--subscription-qos <qos>', 'QoS of the subscriptions; 0 on a NATS cluster (docs/operations.md)')
        .choices(['0', '1'])
        .default('1'),
    )
    .addOption(
      new Option('--publish-qos <qos>', 'QoS of requests, replies, cancels, leases and vouchers; 0 on a NATS cluster (docs/operations.md)')
        .choices(['0', '1'])
        .default('1'),
    )
    .addOption(
      new Option('--engine <name>', 'the MQTT engine behind the broker URL; its recommended settings become the defaults (docs/cli.md)')
        .choices(BROKER_ENGINES)
        .default('mesh'),
    )
    .hook('preAction', (_this, action) => applyEngineDefaults(action));
}

/** An engine's defaults as option values (engineDefaults in the client layer; QoS as the strings the flags take). */
function engineOptionDefaults(engine: BrokerEngine): Record<string, unknown> {
  return Object.fromEntries(Object.entries(engineDefaults(engine, 'agent')).map(([k, v]) => [k, typeof v === 'number' ? String(v) : v]));
}

/**
 * Sets the settings `--engine` implies on `cmd`, each only where nothing else set it (a flag, a variable or a config
 * file wins); `config show` reports them with the source `engine`. Runs again after the config file is read.
 */
export function applyEngineDefaults(cmd: Command): void {
  const engine = cmd.getOptionValue('engine') as BrokerEngine | undefined;
  if (engine === undefined) return;
  for (const [key, value] of Object.entries(engineOptionDefaults(engine))) {
    const has = (cmd.options as Option[]).some((o) => o.attributeName() === key);
    const source = cmd.getOptionValueSource(key);
    if (has && (source === undefined || source === 'default')) cmd.setOptionValueWithSource(key, value, 'engine');
  }
}

/** What `brokerAccessFlags` gave, as connection options (tls, username, password). MESH_CONFIG for unreadable files. */
export async function brokerAccessFrom(opts: {
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  username?: string;
  passwordFile?: string;
  subscriptionQos?: string;
  publishQos?: string;
}): Promise<{ tls?: MeshTlsOptions; username?: string; password?: string; subscriptionQos?: 0 | 1; publishQos?: 0 | 1 }> {
  const tls = await loadTlsFiles({ ca: opts.tlsCa, cert: opts.tlsCert, key: opts.tlsKey });
  let password: string | undefined;
  if (opts.passwordFile !== undefined) {
    try {
      password = (await readFile(opts.passwordFile, 'utf8')).replace(/\r?\n$/, '');
    } catch (cause) {
      throw new MeshError('MESH_CONFIG', `cannot read --password-file ${opts.passwordFile}: ${(cause as Error).message}`, { cause });
    }
  }
  return {
    ...(tls ? { tls } : {}),
    ...(opts.username !== undefined ? { username: opts.username } : {}),
    ...(password !== undefined ? { password } : {}),
    ...(opts.subscriptionQos !== undefined ? { subscriptionQos: opts.subscriptionQos === '0' ? (0 as const) : (1 as const) } : {}),
    ...(opts.publishQos !== undefined ? { publishQos: opts.publishQos === '0' ? (0 as const) : (1 as const) } : {}),
  };
}
