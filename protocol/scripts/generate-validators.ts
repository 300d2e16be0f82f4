/**
 * Compiles the TypeBox schemas ahead of time (docs/protocol.md, "Validation"): for every exported
 * schema of a schema module, a standalone check function from TypeBox's `TypeCompiler.Code` and a
 * plain copy of the schema (with TypeBox's global-symbol markers, so TypeBox can still describe a
 * failed check from it), written to a generated TypeScript module that the runtime imports instead
 * of TypeBox. The output is deterministic and committed; the build regenerates it (rewriting only
 * when it changed) and test/validators.test.ts checks that the committed file is what this gives.
 *
 *   npm run generate              writes every target
 *   npm run generate -- --check   exits 1 when a committed file is stale
 */
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Kind, type TSchema } from '@sinclair/typebox';
import { TypeCompiler } from '@sinclair/typebox/compiler';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface Target {
  /** The schema module (TypeBox), relative to the repository root. */
  schemas: string;
  /** The generated module, relative to the repository root. */
  out: string;
  /** Where the generated module imports `validator` and `Validator` from. */
  validatorFrom: string;
}

export const TARGETS: readonly Target[] = [
  { schemas: 'protocol/src/schemas.ts', out: 'protocol/src/validators.generated.ts', validatorFrom: './validate.ts' },
  { schemas: 'protocol/src/deployment-schema.ts', out: 'protocol/src/deployment.generated.ts', validatorFrom: './validate.ts' },
  { schemas: 'edge-agent/src/manifest-schema.ts', out: 'edge-agent/src/manifest.generated.ts', validatorFrom: '@edge-mesh/protocol' },
];

/** TypeBox's markers are registered symbols (Symbol.for), so plain objects can carry them without TypeBox. */
const MARKERS: Record<string, string> = {
  'TypeBox.Kind': 'KIND',
  'TypeBox.Optional': 'OPTIONAL',
  'TypeBox.Readonly': 'READONLY',
  'TypeBox.Hint': 'HINT',
};
const OPTIONAL = Symbol.for('TypeBox.Optional');

const isSchema = (value: unknown): value is TSchema => typeof value === 'object' && value !== null && Kind in value;

/** Renders a schema as a TypeScript object literal; subtrees equal to an earlier named schema become references. */
class Renderer {
  readonly used = new Set<string>();
  /** Canonical (indent 0) rendering of each named schema already written → its name. */
  private readonly named = new Map<string, string>();

  name(schema: TSchema, name: string): void {
    this.named.set(this.render(schema, 0, false), name);
  }

  render(value: unknown, indent: number, share = true): string {
    if (value === null || typeof value === 'boolean' || typeof value === 'string') return JSON.stringify(value);
    if (typeof value === 'number') {
      if (!Number.isFinite(value)) throw new Error(`cannot write the number ${value}`);
      return JSON.stringify(value);
    }
    if (Array.isArray(value)) {
      if (value.length === 0) return '[]';
      const pad = '  '.repeat(indent + 1);
      return `[\n${value.map((v) => `${pad}${this.render(v, indent + 1)},\n`).join('')}${'  '.repeat(indent)}]`;
    }
    if (typeof value !== 'object' || Object.getPrototypeOf(value) !== Object.prototype)
      throw new Error(`cannot write ${Object.prototype.toString.call(value)} into a plain schema`);
    const record = value as Record<string | symbol, unknown>;
    if (share && isSchema(value)) {
      // A copy of a named schema, possibly marked optional: refer to it instead of writing it again.
      const { [OPTIONAL]: optional, ...rest } = record;
      const name = this.named.get(this.render(rest, 0, false));
      if (name !== undefined) return optional === undefined ? name : `{ ...${name}, [OPTIONAL]: ${JSON.stringify(optional)} }`;
    }
    const pad = '  '.repeat(indent + 1);
    const lines: string[] = [];
    for (const symbol of Object.getOwnPropertySymbols(record)) {
      const marker =
        symbol.description !== undefined && Symbol.for(symbol.description) === symbol ? MARKERS[symbol.description] : undefined;
      if (marker === undefined) throw new Error(`unknown symbol ${String(symbol)} in a schema`);
      this.used.add(marker);
      lines.push(`${pad}[${marker}]: ${this.render(record[symbol], indent + 1)},\n`);
    }
    for (const key of Object.keys(record)) lines.push(`${pad}${JSON.stringify(key)}: ${this.render(record[key], indent + 1)},\n`);
    return lines.length === 0 ? '{}' : `{\n${lines.join('')}${'  '.repeat(indent)}}`;
  }
}

/** TypeBox's compiled check as an expression: the generated code in a closure that returns the function. */
function checkCode(schema: TSchema): string {
  const code = TypeCompiler.Code(schema, [], { language: 'javascript' });
  const header = 'return function check(value) {';
  if (!code.includes(header)) throw new Error('unexpected TypeCompiler.Code output');
  if (/\b(kind|format|hash)\(/.test(code)) throw new Error('a schema needs a TypeBox registry at run time');
  return `(() => {\n${code.replace(header, 'return function check(value: any): boolean {')}\n})()`;
}

/** The generated module for a target, as text. */
export async function render(target: Target): Promise<string> {
  const module = (await import(pathToFileURL(path.join(ROOT, target.schemas)).href)) as Record<string, unknown>;
  const schemas = Object.entries(module).filter((entry): entry is [string, TSchema] => isSchema(entry[1]));
  const renderer = new Renderer();
  // Smaller schemas first, so a schema that contains another can refer to it.
  const sized = schemas.map(([name, schema]) => ({ name, schema, size: renderer.render(schema, 0, false).length }));
  sized.sort((a, b) => a.size - b.size || (a.name < b.name ? -1 : 1));
  const typesFrom = `./${path.relative(path.dirname(target.out), target.schemas).split(path.sep).join('/')}`;
  const body: string[] = [];
  for (const { name, schema } of sized) {
    if (!name.endsWith('Schema')) throw new Error(`${target.schemas}: schema export ${name} must end in Schema`);
    const base = name.slice(0, -'Schema'.length);
    body.push(`export const ${name} = ${renderer.render(schema, 0, false)} as unknown as typeof S.${name};\n`);
    body.push(`export const check${base}: Validator<Static<typeof S.${name}>> = validator(${name}, ${checkCode(schema)});\n`);
    renderer.name(schema, name);
  }
  const markers = Object.entries(MARKERS).filter(([, constant]) => renderer.used.has(constant));
  return [
    `// Generated by protocol/scripts/generate-validators.ts from ${typesFrom} (TypeBox's TypeCompiler.Code). Do not edit:\n`,
    '// change the schemas there and run `npm run generate` (the build does), then commit this file.\n',
    '// The check functions are TypeBox output in plain JavaScript, not written for the type checker; every\n',
    '// export has an explicit type, and test/validators.test.ts holds them to TypeBox and the schemas.\n',
    '// @ts-nocheck\n',
    "import type { Static } from '@sinclair/typebox';\n",
    `import { type Validator, validator } from '${target.validatorFrom}';\n`,
    `import type * as S from '${typesFrom}';\n`,
    '\n',
    ...markers.map(([description, constant]) => `const ${constant} = Symbol.for('${description}');\n`),
    ...body.flatMap((part) => ['\n', part]),
  ].join('');
}

async function main(): Promise<void> {
  const check = process.argv.includes('--check');
  let stale = 0;
  for (const target of TARGETS) {
    const file = path.join(ROOT, target.out);
    const text = await render(target);
    let current: string | undefined;
    try {
      current = readFileSync(file, 'utf8');
    } catch {}
    if (current === text) continue;
    if (check) {
      stale++;
      process.stderr.write(`${target.out} is stale: run npm run generate\n`);
    } else {
      writeFileSync(file, text);
      process.stdout.write(`wrote ${target.out}\n`);
    }
  }
  if (stale > 0) process.exitCode = 1;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) await main();
