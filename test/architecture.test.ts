/**
 * The layering of the workspace (docs/architecture.md): `protocol` is the pure wire contract, the client
 * layer builds on it, each part imports only those two (the agent and the router also the escrow
 * bindings), `demo` and `cli` wire everything, and no file imports itself back through a circle.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { ROOT } from './helpers.ts';

/** Folder → the workspace packages it may import. */
const ALLOWED: Record<string, readonly string[]> = {
  protocol: [],
  client: ['protocol'],
  contracts: ['protocol'],
  broker: ['protocol', 'client'],
  'edge-agent': ['protocol', 'client', 'contracts'],
  router: ['protocol', 'client', 'contracts'],
  sdk: ['protocol', 'client'],
  'firmware-bridge': ['protocol', 'client'],
  demo: ['protocol', 'client', 'contracts', 'broker', 'edge-agent', 'router', 'sdk', 'firmware-bridge'],
  cli: ['protocol', 'client', 'contracts', 'broker', 'edge-agent', 'router', 'sdk', 'firmware-bridge', 'demo'],
};
const FOLDER_OF_PACKAGE: Record<string, string> = {};
for (const folder of Object.keys(ALLOWED)) {
  const pkg = JSON.parse(readFileSync(path.join(ROOT, folder, 'package.json'), 'utf8')) as { name: string };
  FOLDER_OF_PACKAGE[pkg.name] = folder;
}

/** Built-in modules that open sockets or run timers: none of them belongs in the wire contract. */
const IMPURE_BUILTINS = new Set([
  'node:net',
  'node:dgram',
  'node:http',
  'node:https',
  'node:http2',
  'node:tls',
  'node:timers',
  'node:child_process',
  'node:worker_threads',
  'node:fs',
  'node:fs/promises',
]);
const IMPORT = /(?:import|export)\s[^'"]*?from\s*['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)|import\s+['"]([^'"]+)['"]/g;

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return out;
  }
  for (const name of names) {
    const full = path.join(dir, name);
    if (statSync(full).isDirectory()) {
      if (name !== 'node_modules' && name !== 'dist') out.push(...sourceFiles(full));
    } else if (/\.(ts|mts|mjs|js)$/.test(name) && !name.endsWith('.d.ts')) out.push(full);
  }
  return out;
}

function importsOf(file: string): string[] {
  // Comments may show imports in examples; only code counts.
  const text = readFileSync(file, 'utf8')
    .replace(/\/\*[\s\S]*?\*\//g, '')
    .replace(/^\s*\/\/.*$/gm, '');
  return [...text.matchAll(IMPORT)].map((m) => m[1] ?? m[2] ?? m[3]!);
}

const packageOf = (spec: string): string => (spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0]!);

function declaredDependencies(folder: string): Set<string> {
  const pkg = JSON.parse(readFileSync(path.join(ROOT, folder, 'package.json'), 'utf8')) as Record<
    string,
    Record<string, string> | undefined
  >;
  return new Set([...Object.keys(pkg.dependencies ?? {}), ...Object.keys(pkg.peerDependencies ?? {})]);
}

test('each part imports only the packages below it, and declares every package it imports', () => {
  const violations: string[] = [];
  let checked = 0;
  for (const [folder, allowed] of Object.entries(ALLOWED)) {
    const declared = declaredDependencies(folder);
    for (const file of sourceFiles(path.join(ROOT, folder, 'src'))) {
      const where = path.relative(ROOT, file);
      for (const spec of importsOf(file)) {
        checked++;
        if (spec.startsWith('node:')) continue;
        if (spec.startsWith('.')) {
          const target = path.resolve(path.dirname(file), spec);
          if (!target.startsWith(path.join(ROOT, folder, 'src') + path.sep))
            violations.push(`${where} reaches out of its package: ${spec}`);
          continue;
        }
        const pkg = packageOf(spec);
        const targetFolder = FOLDER_OF_PACKAGE[pkg];
        if (targetFolder !== undefined && !allowed.includes(targetFolder))
          violations.push(`${where} imports ${spec}: ${folder} may import only ${allowed.join(', ') || 'nothing of ours'}`);
        if (!declared.has(pkg)) violations.push(`${where} imports ${pkg}, which ${folder}/package.json does not declare`);
      }
    }
  }
  assert.ok(checked > 200, `only ${checked} imports seen: is the scan broken?`);
  assert.deepEqual(violations, []);
});

test('protocol is pure: no MQTT or RPC client, no sockets, no timers', () => {
  const allowedThirdParty = new Set(['@sinclair/typebox', 'cborg']);
  const violations: string[] = [];
  for (const file of sourceFiles(path.join(ROOT, 'protocol', 'src'))) {
    const where = path.relative(ROOT, file);
    for (const spec of importsOf(file)) {
      if (spec.startsWith('.')) continue;
      if (spec.startsWith('node:') ? IMPURE_BUILTINS.has(spec) : !allowedThirdParty.has(packageOf(spec)))
        violations.push(`${where} imports ${spec}`);
    }
    const code = readFileSync(file, 'utf8')
      .replace(/\/\*[\s\S]*?\*\//g, '')
      .replace(/\/\/.*$/gm, '');
    if (/\bset(Timeout|Interval|Immediate)\s*\(/.test(code)) violations.push(`${where} runs timers`);
  }
  assert.deepEqual(violations, []);
});

test('no import circles between source files', () => {
  const graph = new Map<string, string[]>();
  const resolveSpec = (file: string, spec: string): string | undefined => {
    if (spec.startsWith('.')) return path.resolve(path.dirname(file), spec);
    const folder = FOLDER_OF_PACKAGE[packageOf(spec)];
    if (folder === undefined) return undefined;
    const sub = spec.slice(packageOf(spec).length).replace(/^\//, '');
    return path.join(ROOT, folder, 'src', `${sub === '' ? (folder === 'cli' ? 'main' : 'index') : sub}.ts`);
  };
  for (const folder of Object.keys(ALLOWED)) {
    for (const file of sourceFiles(path.join(ROOT, folder, 'src'))) {
      graph.set(
        file,
        importsOf(file)
          .map((spec) => resolveSpec(file, spec))
          .filter((t): t is string => t !== undefined),
      );
    }
  }
  // Tarjan's strongly connected components: any component of two or more files is a circle.
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const circles: string[][] = [];
  let next = 0;
  const visit = (v: string) => {
    index.set(v, next);
    low.set(v, next++);
    stack.push(v);
    onStack.add(v);
    for (const w of graph.get(v) ?? []) {
      if (!graph.has(w)) continue;
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
    }
    if (low.get(v) === index.get(v)) {
      const component: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        onStack.delete(w);
        component.push(path.relative(ROOT, w));
      } while (w !== v);
      if (component.length > 1) circles.push(component.sort());
    }
  };
  for (const v of graph.keys()) if (!index.has(v)) visit(v);
  assert.ok(graph.size > 60, `only ${graph.size} files seen`);
  assert.deepEqual(circles, []);
});

test('benchmarks and tests use no CLI internals; benchmarks import no test fixtures', () => {
  const violations: string[] = [];
  for (const dir of ['bench', 'test']) {
    for (const file of sourceFiles(path.join(ROOT, dir))) {
      for (const spec of importsOf(file)) {
        const target = spec.startsWith('.') ? path.resolve(path.dirname(file), spec) : undefined;
        if (target?.startsWith(path.join(ROOT, 'cli') + path.sep) || packageOf(spec) === '@edge-mesh/cli')
          violations.push(`${path.relative(ROOT, file)} imports ${spec}`);
        if (dir === 'bench' && target?.startsWith(path.join(ROOT, 'test') + path.sep))
          violations.push(`${path.relative(ROOT, file)} imports ${spec}`);
      }
    }
  }
  assert.deepEqual(violations, []);
});
