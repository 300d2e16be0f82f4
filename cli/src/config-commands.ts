/** `edge-mesh config check|schema|show`: the configuration files of the long-running commands (cli/src/config.ts). */
import { MeshError } from '@edge-mesh/protocol';
import type { Command } from 'commander';
import { CONFIG_ROLES, type ConfigRole, commandAt, configSchema, isConfigRole, readConfigFile, settings } from './config.ts';

const roleOf = (value: string): ConfigRole => {
  if (!isConfigRole(value)) {
    throw new MeshError('MESH_CONFIG', `no role ${JSON.stringify(value)}: one of ${Object.keys(CONFIG_ROLES).join(', ')}`);
  }
  return value;
};

export function registerConfigCommands(program: Command, build: () => Command): void {
  const config = program
    .command('config')
    .description(
      `configuration files of ${Object.keys(CONFIG_ROLES).join(', ')}: check one, print its JSON Schema, show what a command would run with`,
    );

  config
    .command('check')
    .description('check a configuration file for a role: every unknown key and bad value at once (exit 78 if any)')
    .argument('<role>', Object.keys(CONFIG_ROLES).join(' | '))
    .argument('<file>', 'the JSON file')
    .action(async (role: string, file: string) => {
      const values = await readConfigFile(commandAt(program, CONFIG_ROLES[roleOf(role)]), file);
      process.stdout.write(`${file}: ok, ${values.size} setting${values.size === 1 ? '' : 's'} for ${role}\n`);
    });

  config
    .command('schema')
    .description("print the JSON Schema of a role's configuration file (for editors: point the file's $schema at it)")
    .argument('<role>', Object.keys(CONFIG_ROLES).join(' | '))
    .action((role: string) => {
      const r = roleOf(role);
      process.stdout.write(`${JSON.stringify(configSchema(commandAt(program, CONFIG_ROLES[r]), r), null, 2)}\n`);
    });

  config
    .command('show')
    .description(
      "print, as JSON, the settings a role's command would run with and where each came from (flag, env, config, engine, default), without running it; pass the command's own flags after the role",
    )
    .argument('<role>', Object.keys(CONFIG_ROLES).join(' | '))
    .argument('[flags...]', "the command's flags, as you would give them")
    .allowUnknownOption()
    .helpOption(false)
    .action(async (role: string, flags: string[]) => {
      const r = roleOf(role);
      // A fresh program whose role command prints instead of running: the same parsing, files and variables.
      const fresh = build();
      const target = commandAt(fresh, CONFIG_ROLES[r]);
      target.action(() => {
        const out: Record<string, { value: unknown; source: string }> = {};
        for (const key of settings(target).keys()) {
          const value = target.getOptionValue(key);
          if (value === undefined) continue;
          out[key] = { value, source: target.getOptionValueSource(key) ?? 'default' };
        }
        process.stdout.write(`${JSON.stringify(out)}\n`);
      });
      await fresh.parseAsync([...CONFIG_ROLES[r], ...flags], { from: 'user' });
    });
}
