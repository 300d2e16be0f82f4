/** A part imports `protocol/` and its own files, never another part's internals (DESIGN.md, "Parts"). */
import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { ROOT } from './helpers.ts';

const PARTS = ['protocol', 'broker', 'edge-agent', 'router', 'contracts', 'firmware-bridge', 'sdk'];
const IMPORT = /(?:import|export)\s[^'"]*?from\s*['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)|import\s+['"]([^'"]+)['"]/g;

async function sourceFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  let entries;
  try {
    entries = await readdir(dir, { withFileTypes: true });
  } catch {
    return out;
  }
  for (const e of entries) {
    const full = path.join(dir, e.name);
    if (e.isDirectory() && e.name !== 'node_modules') out.push(...(await sourceFiles(full)));
    else if (/\.(ts|mts|mjs|js)$/.test(e.name)) out.push(full);
  }
  return out;
}

test('parts import only protocol/ and their own files', async () => {
  const violations: string[] = [];
  let checked = 0;
  for (const part of PARTS) {
    const partDir = path.join(ROOT, part);
    for (const file of await sourceFiles(partDir)) {
      const text = await readFile(file, 'utf8');
      for (const m of text.matchAll(IMPORT)) {
        const spec = m[1] ?? m[2] ?? m[3]!;
        checked++;
        if (!spec.startsWith('.')) continue;
        const target = path.resolve(path.dirname(file), spec);
        const inOwn = target.startsWith(partDir + path.sep);
        const inProtocol = target.startsWith(path.join(ROOT, 'protocol') + path.sep);
        const allowed = part === 'protocol' ? inOwn : inOwn || inProtocol;
        if (!allowed) violations.push(`${path.relative(ROOT, file)} imports ${spec}`);
      }
    }
  }
  assert.ok(checked > 20, `only ${checked} imports seen: is the scan broken?`);
  assert.deepEqual(violations, []);
});
