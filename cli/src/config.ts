/**
 * Configuration files and environment variables for the long-running commands (docs/cli.md, "Configuration").
 *
 * Every option of a role's command (broker, agent, router, bridge run, relay) can be given three more ways than
 * its flag, and the first that gives it wins: the flag, then `MESH_<ROLE>_<KEY>` in the environment, then the
 * key in the JSON file named by `--config` (or `MESH_<ROLE>_CONFIG`), then the option's default. A file key is
 * the option's name in camelCase (`--inline-max-ms` is `inlineMaxMs`, `--no-chain` is `chain: false`); the
 * variable is the same name in upper snake case (`MESH_AGENT_INLINE_MAX_MS`). Values go through the flag's own
 * parser and choices, so a file cannot set what the flag would refuse. Every bad key and value of a file is
 * reported at once, as one MESH_CONFIG error.
 *
 * The options come from the commands themselves, so a flag added to a command is at once a file key and a
 * variable, and `edge-mesh config schema ROLE` describes it.
 */
import { readFile } from 'node:fs/promises';
import { MeshError } from '@edge-mesh/protocol';
import type { Command, Option } from 'commander';
import {
  applyEngineDefaults,
  collect,
  confirmationsArg,
  nonNegativeInt,
  nonNegativeNumber,
  positiveInt,
  positiveNumber,
} from './options.ts';

/** The commands a configuration file can drive, by role name: their paths under `edge-mesh`. */
export const CONFIG_ROLES = {
  broker: ['broker'],
  agent: ['agent'],
  router: ['router'],
  bridge: ['bridge', 'run'],
  relay: ['relay'],
} as const;
export type ConfigRole = keyof typeof CONFIG_ROLES;

export const isConfigRole = (value: string): value is ConfigRole => Object.hasOwn(CONFIG_ROLES, value);

/** Options that are not settings: how to find the settings, and help. */
const NOT_SETTINGS = new Set(['config', 'help']);

/** An option that takes no value (`--x`, `--no-x`): commander's isBoolean() says false for the negated form. */
const takesNoValue = (option: Option): boolean => !option.required && !option.optional;

const snake = (camel: string): string => camel.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toUpperCase();

export const envName = (role: ConfigRole, key: string): string => `MESH_${role.toUpperCase()}_${snake(key)}`;

/** The options of a command that are settings, by key. */
export function settings(cmd: Command): Map<string, Option> {
  const out = new Map<string, Option>();
  for (const option of cmd.options as Option[]) {
    const key = option.attributeName();
    if (NOT_SETTINGS.has(key)) continue;
    // `--x` and `--no-x` share a key: the negated form describes it (its default is the positive one).
    if (!out.has(key) || option.negate) out.set(key, option);
  }
  return out;
}

type Source = 'env' | 'config';

/** Parses one value for `option` the way its flag would, or says why not. */
function parseValue(option: Option, raw: unknown, from: Source): { value: unknown } | { problem: string } {
  const key = option.attributeName();
  if (takesNoValue(option)) {
    if (typeof raw === 'boolean') return { value: raw };
    if (from === 'env' && typeof raw === 'string') {
      if (/^(1|true|yes|on)$/i.test(raw)) return { value: true };
      if (/^(0|false|no|off)$/i.test(raw)) return { value: false };
    }
    return { problem: `${key} must be true or false` };
  }
  const repeatable = option.parseArg === collect || option.variadic;
  const items: unknown[] = repeatable && Array.isArray(raw) ? raw : [raw];
  if (!repeatable && Array.isArray(raw)) return { problem: `${key} takes one value, not a list` };
  let value: unknown = repeatable ? [] : undefined;
  for (const item of items) {
    if (typeof item !== 'string' && typeof item !== 'number') return { problem: `${key} must be a string or a number` };
    const text = String(item);
    if (option.argChoices && !option.argChoices.includes(text)) {
      return { problem: `${key} must be one of ${option.argChoices.join(', ')}, not ${JSON.stringify(text)}` };
    }
    try {
      value = option.parseArg ? option.parseArg(text, value) : repeatable ? [...(value as unknown[]), text] : text;
    } catch (err) {
      return { problem: `${key} ${(err as Error).message.replace(/^.*?: /, '')} (got ${JSON.stringify(item)})` };
    }
  }
  return { value };
}

/** Reads and checks a configuration file for `cmd`: the values by key, or every problem at once. */
export async function readConfigFile(cmd: Command, file: string): Promise<Map<string, unknown>> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new MeshError('MESH_CONFIG', `cannot read the configuration file ${file}: ${(err as Error).message}`, { details: { file } });
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new MeshError('MESH_CONFIG', `${file} is not JSON: ${(err as Error).message}`, { details: { file } });
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new MeshError('MESH_CONFIG', `${file} must hold a JSON object of settings`, { details: { file } });
  }
  const known = settings(cmd);
  const values = new Map<string, unknown>();
  const problems: string[] = [];
  for (const [key, raw] of Object.entries(parsed)) {
    if (key === '$schema') continue;
    const option = known.get(key);
    if (!option) {
      problems.push(`unknown key ${JSON.stringify(key)}`);
      continue;
    }
    const result = parseValue(option, raw, 'config');
    if ('problem' in result) problems.push(result.problem);
    else values.set(key, result.value);
  }
  if (problems.length > 0) {
    throw new MeshError('MESH_CONFIG', `${file}: ${problems.length} problem${problems.length === 1 ? '' : 's'}: ${problems.join('; ')}`, {
      details: { file, problems },
    });
  }
  return values;
}

/**
 * Fills the options of `cmd` its flags did not set from the environment and then the file, and records where
 * each value came from (`cmd.getOptionValueSource(key)` is 'cli', 'env', 'config' or 'default').
 */
export async function applyConfig(cmd: Command, role: ConfigRole, env: NodeJS.ProcessEnv = process.env): Promise<void> {
  const opts = cmd.opts() as { config?: string };
  const file = opts.config ?? env[envName(role, 'config')];
  const fromFile = file ? await readConfigFile(cmd, file) : new Map<string, unknown>();
  const problems: string[] = [];
  for (const [key, option] of settings(cmd)) {
    if (cmd.getOptionValueSource(key) === 'cli') continue;
    const raw = env[envName(role, key)];
    if (raw !== undefined) {
      const result = parseValue(option, raw, 'env');
      if ('problem' in result) problems.push(`${envName(role, key)}: ${result.problem}`);
      else cmd.setOptionValueWithSource(key, result.value, 'env');
      continue;
    }
    if (fromFile.has(key)) cmd.setOptionValueWithSource(key, fromFile.get(key), 'config');
  }
  if (problems.length > 0) {
    throw new MeshError('MESH_CONFIG', `the environment: ${problems.join('; ')}`, { details: { problems } });
  }
}

/**
 * Adds `--config FILE` to a role's command (call it once the command has all its options) and resolves files and
 * variables before its action runs. A required option may then come from either: commander's own check, which
 * runs before any hook, is replaced by the same check after them.
 */
export function configurable(cmd: Command, role: ConfigRole): Command {
  const required = (cmd.options as Option[]).filter((o) => o.mandatory);
  for (const option of required) option.mandatory = false;
  return cmd
    .option('--config <file>', `a JSON file of settings (keys: the options' names in camelCase; env MESH_${role.toUpperCase()}_CONFIG)`)
    .hook('preAction', async (_this, actionCommand) => {
      await applyConfig(actionCommand, role);
      // `--engine` may have come from the file or a variable: its defaults go where nothing else set a value.
      applyEngineDefaults(actionCommand);
      for (const option of required) {
        if (actionCommand.getOptionValue(option.attributeName()) === undefined) {
          actionCommand.error(
            `error: required option '${option.flags}' not specified (or ${envName(role, option.attributeName())}, or ${option.attributeName()} in --config)`,
            { code: 'commander.missingMandatoryOptionValue', exitCode: EXIT.usage },
          );
        }
      }
    });
}

/** Exit codes (sysexits.h): a bad command line, a bad configuration, anything else that failed. */
export const EXIT = { usage: 64, config: 78, runtime: 1 } as const;

/** The command at `path` under `program` (`['bridge', 'run']`). */
export function commandAt(program: Command, path: readonly string[]): Command {
  let cmd = program;
  for (const name of path) {
    const next = cmd.commands.find((c) => c.name() === name);
    if (!next) throw new MeshError('MESH_INTERNAL', `no command ${path.join(' ')}`);
    cmd = next;
  }
  return cmd;
}

/** JSON types of the shared option parsers, for the schema. */
const PARSER_TYPES = new Map<unknown, Record<string, unknown>>([
  [positiveInt, { type: 'integer', minimum: 1 }],
  [nonNegativeInt, { type: 'integer', minimum: 0 }],
  [positiveNumber, { type: 'number', exclusiveMinimum: 0 }],
  [nonNegativeNumber, { type: 'number', minimum: 0 }],
  [collect, { type: 'array', items: { type: 'string' } }],
  [confirmationsArg, { anyOf: [{ type: 'integer', minimum: 0 }, { enum: ['safe', 'finalized'] }] }],
]);

/** A JSON Schema (draft 2020-12) of a role's configuration file, for editors and `config check`'s readers. */
export function configSchema(cmd: Command, role: ConfigRole): Record<string, unknown> {
  const properties: Record<string, unknown> = { $schema: { type: 'string' } };
  for (const [key, option] of settings(cmd)) {
    const base: Record<string, unknown> = takesNoValue(option)
      ? { type: 'boolean' }
      : option.variadic
        ? { type: 'array', items: { type: 'string' } }
        : option.argChoices
          ? { enum: [...option.argChoices] }
          : (PARSER_TYPES.get(option.parseArg) ?? (option.parseArg ? {} : { type: 'string' }));
    const description = option.description.replace(/\s+/g, ' ');
    const fallback = option.negate ? true : option.defaultValue;
    properties[key] = {
      ...base,
      description: `${description} (flag ${option.negate ? option.long?.replace(/^--no-/, '--') : option.long}${option.negate ? ` / ${option.long}` : ''}, env ${envName(role, key)})`,
      ...(fallback !== undefined && typeof fallback !== 'function' ? { default: fallback } : {}),
      'x-flag': option.long,
      'x-env': envName(role, key),
    };
  }
  return {
    $schema: 'https://json-schema.org/draft/2020-12/schema',
    title: `edge-mesh ${CONFIG_ROLES[role].join(' ')} configuration`,
    type: 'object',
    additionalProperties: false,
    properties,
  };
}
