/**
 * Compiles the escrow contracts with solc-js (offline, the `solc` npm package) and caches the ABI and
 * bytecode under contracts/.build/ (git-ignored), keyed by a hash of every source, the compiler version,
 * the OpenZeppelin version and the settings. A second run with nothing changed reads one JSON file.
 */
import { createHash } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { MeshError } from '@edge-mesh/protocol';

/** The package folder (the same from `src/` under a loader and from `dist/`). */
export const CONTRACTS_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/** The Solidity sources. */
export const SOL_DIR = path.join(CONTRACTS_DIR, 'sol');
export const BUILD_DIR = path.join(CONTRACTS_DIR, '.build');

export interface Artifact {
  contractName: string;
  abi: unknown[];
  /** 0x-prefixed creation bytecode. */
  bytecode: string;
}
export type Artifacts = Record<string, Artifact>;

interface Solc {
  version(): string;
  compile(input: string, callbacks?: { import: (p: string) => { contents: string } | { error: string } }): string;
}

const require = createRequire(import.meta.url);

export const SOLC_SETTINGS = {
  optimizer: { enabled: true, runs: 10_000 },
  evmVersion: 'cancun',
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } },
} as const;

/** Our .sol files, as solc source units named relative to sol/ (test contracts under sol/test/). */
function ourSources(): Record<string, { content: string }> {
  const out: Record<string, { content: string }> = {};
  const walk = (dir: string, prefix: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      if (e.name.startsWith('.') || e.name === 'node_modules') continue;
      if (e.isDirectory()) walk(path.join(dir, e.name), `${prefix}${e.name}/`);
      else if (e.name.endsWith('.sol')) out[`${prefix}${e.name}`] = { content: readFileSync(path.join(dir, e.name), 'utf8') };
    }
  };
  walk(SOL_DIR, '');
  return out;
}

function findImport(importPath: string): { contents: string } | { error: string } {
  try {
    return { contents: readFileSync(require.resolve(importPath), 'utf8') };
  } catch {
    return { error: `not found: ${importPath}` };
  }
}

function packageVersion(name: string): string {
  const dir = path.dirname(require.resolve(`${name}/package.json`));
  return (JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as { version: string }).version;
}

let memo: { key: string; artifacts: Artifacts } | undefined;

/** Compiles (or reads the cache) and returns every contract by name: MeshEscrow, MockUSDC, HostileToken, QuirkyToken. */
export function compileContracts({ log }: { log?: (line: string) => void } = {}): Artifacts {
  const sources = ourSources();
  const solcVersion = packageVersion('solc');
  const hash = createHash('sha256');
  hash.update(JSON.stringify({ solcVersion, oz: packageVersion('@openzeppelin/contracts'), SOLC_SETTINGS }));
  for (const [name, { content }] of Object.entries(sources)) hash.update(`\0${name}\0${content}`);
  const key = hash.digest('hex').slice(0, 24);
  if (memo?.key === key) return memo.artifacts;

  const cacheFile = path.join(BUILD_DIR, `artifacts-${key}.json`);
  try {
    const artifacts = JSON.parse(readFileSync(cacheFile, 'utf8')) as Artifacts;
    memo = { key, artifacts };
    return artifacts;
  } catch {
    /* not cached yet */
  }

  const started = performance.now();
  const solc = require('solc') as Solc;
  const input = { language: 'Solidity', sources, settings: SOLC_SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImport })) as {
    errors?: { severity: string; formattedMessage: string }[];
    contracts?: Record<string, Record<string, { abi: unknown[]; evm: { bytecode: { object: string } } }>>;
  };
  const errors = (output.errors ?? []).filter((e) => e.severity === 'error');
  if (errors.length > 0) {
    // Our own Solidity does not compile: a defect of this checkout, not of the caller's input.
    throw new MeshError('MESH_INTERNAL', `solc ${solc.version()} failed:\n${errors.map((e) => e.formattedMessage).join('\n')}`, {
      details: { solc: solc.version(), errors: errors.length },
    });
  }
  for (const w of output.errors ?? []) if (w.severity !== 'error') log?.(`solc: ${w.formattedMessage.split('\n')[0]}`);

  const artifacts: Artifacts = {};
  for (const [unit, contracts] of Object.entries(output.contracts ?? {})) {
    if (!(unit in sources)) continue; // OpenZeppelin's own units
    for (const [contractName, c] of Object.entries(contracts)) {
      if (c.evm.bytecode.object.length === 0) continue; // interfaces and abstract contracts
      artifacts[contractName] = { contractName, abi: c.abi, bytecode: `0x${c.evm.bytecode.object}` };
    }
  }
  mkdirSync(BUILD_DIR, { recursive: true });
  const tmp = `${cacheFile}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify(artifacts));
  renameSync(tmp, cacheFile);
  log?.(`compiled ${Object.keys(artifacts).join(', ')} with solc ${solcVersion} in ${Math.round(performance.now() - started)} ms`);
  memo = { key, artifacts };
  return artifacts;
}

export function artifact(name: 'MeshEscrow' | 'MockUSDC' | 'HostileToken' | 'QuirkyToken' | (string & {})): Artifact {
  const a = compileContracts()[name];
  if (!a) throw new MeshError('MESH_NOT_FOUND', `no compiled contract named ${name}`, { details: { contract: name } });
  return a;
}
