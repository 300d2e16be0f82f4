/**
 * The one error registry (protocol/errors.ts) and its page (docs/errors.md): every code is documented with its
 * status and retryability, the broker's refusal reasons and the bridge's wire codes are documented with the codes
 * they map to, and no package raises a plain Error or declares an error class of its own.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { BridgeErrorCode, WIRE_TO_MESH } from '@edge-mesh/firmware-bridge';
import { ERROR_CODES, isMeshErrorCode, MeshError } from '@edge-mesh/protocol';
import { REFUSAL_CODES } from '../broker/src/handlers/refusals.ts';
import { ROOT } from './helpers.ts';

const DOC = readFileSync(path.join(ROOT, 'docs', 'errors.md'), 'utf8');

/** The rows of the markdown table that follows `heading`, split into trimmed cells. */
function tableAfter(heading: string): string[][] {
  const start = DOC.indexOf(heading);
  assert.ok(start >= 0, `docs/errors.md has "${heading}"`);
  const lines = DOC.slice(start).split('\n');
  const first = lines.findIndex((l) => l.startsWith('|'));
  const rows: string[][] = [];
  for (const line of lines.slice(first + 2)) {
    if (!line.startsWith('|')) break;
    rows.push(
      line
        .split('|')
        .slice(1, -1)
        .map((c) => c.trim()),
    );
  }
  return rows;
}

const unquote = (cell: string) => cell.replace(/`/g, '');

test('docs/errors.md lists every code with its HTTP status and retryability, and nothing else', () => {
  const rows = tableAfter('## The codes');
  const documented = new Map(rows.map(([code, status, retryable]) => [unquote(code!), { status: Number(status), retryable }]));
  assert.deepEqual([...documented.keys()].sort(), Object.keys(ERROR_CODES).sort());
  for (const [code, info] of Object.entries(ERROR_CODES)) {
    assert.deepEqual(documented.get(code), { status: info.httpStatus, retryable: info.retryable ? 'yes' : 'no' }, code);
    assert.ok(info.summary.length > 10, `${code} has a summary`);
    const err = new MeshError(code as keyof typeof ERROR_CODES, 'x');
    assert.equal(err.httpStatus, info.httpStatus);
    assert.equal(err.retryable, info.retryable);
  }
  for (const row of rows) assert.ok(row[3]!.length > 20, `${row[0]} says when it happens`);
});

test('docs/errors.md gives every broker refusal reason its code, and every wire code its mesh code', () => {
  const documented = new Map<string, string>();
  for (const [reasons, code] of tableAfter('## Broker refusals')) {
    for (const m of reasons!.matchAll(/`([a-z0-9-]+)`/g)) documented.set(m[1]!, unquote(code!));
  }
  for (const [reason, code] of Object.entries(REFUSAL_CODES)) assert.equal(documented.get(reason), code, reason);
  assert.deepEqual([...documented.keys()].sort(), Object.keys(REFUSAL_CODES).sort());

  const wire = tableAfter('## Firmware devices');
  assert.equal(wire.length, Object.keys(BridgeErrorCode).length);
  for (const [num, name, mesh] of wire) {
    assert.equal(BridgeErrorCode[unquote(name!) as keyof typeof BridgeErrorCode], Number(num), name);
    assert.equal(WIRE_TO_MESH[Number(num) as keyof typeof WIRE_TO_MESH], unquote(mesh!), name);
    assert.ok(isMeshErrorCode(unquote(mesh!)));
  }
});

/** Files whose plain errors are owned by a rewrite under way elsewhere (named in docs/errors.md). */
const EXEMPT = new Set(['edge-agent/src/settler.ts', 'edge-agent/src/worker.mjs']);
const PACKAGES = ['protocol', 'client', 'broker', 'edge-agent', 'router', 'sdk', 'contracts', 'firmware-bridge', 'demo', 'cli'];

function sources(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    const full = path.join(dir, name);
    if (statSync(full).isDirectory()) out.push(...sources(full));
    else if (/\.(ts|mts|mjs|js|cjs)$/.test(name) && !name.endsWith('.d.ts')) out.push(full);
  }
  return out;
}

test('no package raises a plain Error or declares its own error class', () => {
  const plain = /\bnew (Error|TypeError|RangeError|SyntaxError)\(|\bclass \w+ extends \w*Error\b/;
  const found: string[] = [];
  let scanned = 0;
  for (const pkg of PACKAGES) {
    for (const file of sources(path.join(ROOT, pkg, 'src'))) {
      const where = path.relative(ROOT, file).split(path.sep).join('/');
      scanned++;
      if (EXEMPT.has(where)) continue;
      readFileSync(file, 'utf8')
        .split('\n')
        .forEach((line, i) => {
          if (/^\s*(\/\/|\*)/.test(line)) return;
          if (plain.test(line) && !/class MeshError extends Error/.test(line)) found.push(`${where}:${i + 1}: ${line.trim()}`);
        });
    }
  }
  assert.ok(scanned > 80, `only ${scanned} files scanned`);
  assert.deepEqual(found, [], 'raise a MeshError with a code from protocol/errors.ts (docs/errors.md)');
});
