/**
 * Where `edge-mesh deploy` finds the model it rolls out (docs/cli.md, "deploy"): an `.onnx` file, an entry of a
 * models folder (`manifest.json`, manifest.ts), or a Triton model repository.
 *
 * Triton's layout, as its server documents it (docs/user_guide/model_repository.md, "Repository Layout", "Model
 * Versions", "ONNX Models"; docs/user_guide/model_configuration.md for `name` and `default_model_filename`):
 *
 *   <repository>/<model>/config.pbtxt
 *   <repository>/<model>/<version>/model.onnx
 *
 * A version folder is numerically named; one whose name is not a number, or starts with "0", is ignored by Triton,
 * and named explicitly here it is refused. The model file is `model.onnx` unless the configuration's
 * `default_model_filename` says otherwise. The configuration's `name`, when given, must be the model folder's name.
 * An ONNX model stored as a folder (external weights beside the graph) is refused: a bundle is one file.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { type DType, MeshError } from '@edge-mesh/protocol';
import { readManifest } from './manifest.ts';

/** A protobuf text-format message: every field a list of values (a field may repeat). */
export type TextMessage = { [field: string]: TextValue[] };
export type TextValue = string | number | boolean | TextMessage;

const bad = (file: string, why: string) => new MeshError('MESH_CONFIG', `${file}: ${why}`);

/**
 * Parses protobuf text format, the grammar of config.pbtxt (protobuf's text_format: `field: value`, `field { … }`,
 * `field: [a, b]`, `#` comments, `,` or `;` between fields). Enum values come back as strings.
 */
export function parseTextProto(text: string, file = 'config.pbtxt'): TextMessage {
  const tokens: { t: string; line: number }[] = [];
  const lexer = /\s+|#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[{}[\]:,;<>]|[A-Za-z0-9_.+-]+/gy;
  let line = 1;
  for (let i = 0; i < text.length; ) {
    lexer.lastIndex = i;
    const m = lexer.exec(text);
    if (!m) throw bad(file, `line ${line}: cannot read ${JSON.stringify(text.slice(i, i + 20))}`);
    if (!/^\s|^#/.test(m[0])) tokens.push({ t: m[0], line });
    line += m[0].split('\n').length - 1;
    i = lexer.lastIndex;
  }
  let pos = 0;
  const peek = () => tokens[pos]?.t;
  const where = () => `line ${tokens[Math.min(pos, tokens.length - 1)]?.line ?? line}`;
  const expect = (t: string) => {
    if (peek() !== t) throw bad(file, `${where()}: expected ${t}, found ${peek() ?? 'the end'}`);
    pos++;
  };
  const scalar = (): TextValue => {
    const t = tokens[pos++]?.t;
    if (t === undefined) throw bad(file, 'unexpected end');
    if (t.startsWith('"') || t.startsWith("'"))
      return t.slice(1, -1).replace(/\\(.)/g, (_e, c: string) => ({ n: '\n', t: '\t', r: '\r' })[c] ?? c);
    if (/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(t)) return Number(t);
    if (t === 'true' || t === 'false') return t === 'true';
    if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(t)) return t;
    throw bad(file, `${where()}: unexpected ${t}`);
  };
  const message = (close: string | undefined): TextMessage => {
    const out: TextMessage = {};
    while (peek() !== close) {
      const name = tokens[pos++]?.t;
      if (name === undefined || !/^[A-Za-z_][A-Za-z0-9_]*$/.test(name))
        throw bad(file, `${where()}: expected a field name, found ${name ?? 'the end'}`);
      out[name] ??= [];
      const values = out[name];
      const colon = peek() === ':';
      if (colon) pos++;
      let inList = false;
      const value = (): TextValue => {
        const open = peek();
        if (open === '{' || open === '<') {
          pos++;
          const inner = message(open === '{' ? '}' : '>');
          pos++;
          return inner;
        }
        if (!colon && !inList) throw bad(file, `${where()}: expected : after ${name}`);
        return scalar();
      };
      // `field: [a, b]`, and for messages also `field [{…}, {…}]` (how Triton's examples write input and output).
      if (peek() === '[') {
        pos++;
        inList = colon;
        while (peek() !== ']') {
          values.push(value());
          if (peek() === ',') pos++;
          else if (peek() !== ']') throw bad(file, `${where()}: expected , or ] in the list of ${name}`);
        }
        expect(']');
      } else values.push(value());
      if (peek() === ',' || peek() === ';') pos++;
    }
    return out;
  };
  return message(undefined);
}

/** Triton's TYPE_* data types (model_config.proto, DataType) with a mesh tensor dtype. */
const TRITON_DTYPES: Record<string, DType> = {
  TYPE_BOOL: 'bool',
  TYPE_UINT8: 'uint8',
  TYPE_UINT16: 'uint16',
  TYPE_UINT32: 'uint32',
  TYPE_UINT64: 'uint64',
  TYPE_INT8: 'int8',
  TYPE_INT16: 'int16',
  TYPE_INT32: 'int32',
  TYPE_INT64: 'int64',
  TYPE_FP16: 'float16',
  TYPE_FP32: 'float32',
  TYPE_FP64: 'float64',
};

export interface TritonTensor {
  name: string;
  dtype: DType;
  /** The dims as the configuration gives them (without the batch dim that max_batch_size > 0 adds in front); -1 is free. */
  dims: number[];
}

export interface TritonConfig {
  name?: string;
  maxBatchSize: number;
  defaultModelFilename?: string;
  inputs: TritonTensor[];
  outputs: TritonTensor[];
}

const one = (m: TextMessage, field: string): TextValue | undefined => m[field]?.at(-1);

/** The fields of config.pbtxt a deployment needs; MESH_CONFIG for anything else an ONNX model cannot be. */
export function readTritonConfig(text: string, file = 'config.pbtxt'): TritonConfig {
  const m = parseTextProto(text, file);
  const platform = one(m, 'platform');
  const backend = one(m, 'backend');
  if ((platform !== undefined && platform !== 'onnxruntime_onnx') || (backend !== undefined && backend !== 'onnxruntime'))
    throw bad(file, `platform ${String(platform ?? backend)} is not ONNX Runtime: only ONNX models are deployed`);
  const name = one(m, 'name');
  if (name !== undefined && typeof name !== 'string') throw bad(file, 'name is not a string');
  const maxBatchSize = one(m, 'max_batch_size') ?? 0;
  if (typeof maxBatchSize !== 'number' || !Number.isInteger(maxBatchSize) || maxBatchSize < 0)
    throw bad(file, 'max_batch_size is not a non-negative integer');
  const filename = one(m, 'default_model_filename');
  if (filename !== undefined && (typeof filename !== 'string' || filename === '' || /[\\/]|^\.\.?$/.test(filename)))
    throw bad(file, `default_model_filename ${JSON.stringify(filename)} is not a file name`);
  const tensors = (field: 'input' | 'output'): TritonTensor[] =>
    (m[field] ?? []).map((t, i) => {
      if (typeof t !== 'object') throw bad(file, `${field} ${i} is not a message`);
      const tname = one(t, 'name');
      const type = one(t, 'data_type');
      const dims = t.dims ?? [];
      if (typeof tname !== 'string' || tname === '') throw bad(file, `${field} ${i} has no name`);
      if (typeof type !== 'string' || !Object.hasOwn(TRITON_DTYPES, type))
        throw bad(
          file,
          `${field} ${tname}: data_type ${String(type)} is not one the mesh carries (${Object.keys(TRITON_DTYPES).join(', ')})`,
        );
      if (!dims.every((d) => typeof d === 'number' && Number.isInteger(d) && d >= -1))
        throw bad(file, `${field} ${tname}: dims must be integers, -1 for a free dim`);
      return { name: tname, dtype: TRITON_DTYPES[type]!, dims: dims as number[] };
    });
  return {
    ...(name !== undefined ? { name } : {}),
    maxBatchSize,
    ...(filename !== undefined ? { defaultModelFilename: filename } : {}),
    inputs: tensors('input'),
    outputs: tensors('output'),
  };
}

/** What `deploy` rolls out: the bundle's file and what it is. */
export interface ModelSource {
  /** How the path was read: `onnx`, `models-folder` or `triton`. */
  layout: 'onnx' | 'models-folder' | 'triton';
  file: string;
  model: string;
  version?: string;
  priceMicros?: number;
  config?: TritonConfig;
}

const exists = async (p: string) =>
  stat(p).then(
    (s) => s,
    () => undefined,
  );

const numericVersion = (name: string) => /^[1-9][0-9]*$/.test(name);

/**
 * Reads `target` as one of the three layouts. `model` and `version` are the flags (`--model`, `--version`): the
 * model folder of a Triton repository and the version folder (default: the highest numbered one).
 */
export async function readModelSource(target: string, model: string, version: string | undefined): Promise<ModelSource> {
  const s = await exists(target);
  if (!s) throw new MeshError('MESH_CONFIG', `${target} does not exist`);
  if (s.isFile()) {
    if (!target.endsWith('.onnx'))
      throw new MeshError('MESH_CONFIG', `${target} is not an .onnx file, a models folder or a Triton repository`);
    return { layout: 'onnx', file: target, model, ...(version !== undefined ? { version } : {}) };
  }
  // A models folder: manifest.json names the file, version and price of each model.
  const manifestFile = path.join(target, 'manifest.json');
  if (await exists(manifestFile)) {
    const manifest = await readManifest(target);
    const entry = manifest.models.find((e) => e.name === model);
    if (!entry)
      throw new MeshError('MESH_CONFIG', `${manifestFile} has no model ${model} (it has ${manifest.models.map((e) => e.name).join(', ')})`);
    return {
      layout: 'models-folder',
      file: path.join(target, entry.file),
      model,
      version: version ?? entry.version,
      priceMicros: entry.priceMicros,
    };
  }
  // Triton: the repository (with a <model> folder), or the model folder itself.
  const modelDir =
    (await exists(path.join(target, model, 'config.pbtxt'))) || (await exists(path.join(target, model)))?.isDirectory()
      ? path.join(target, model)
      : target;
  const configFile = path.join(modelDir, 'config.pbtxt');
  let config: TritonConfig | undefined;
  if (await exists(configFile)) config = readTritonConfig(await readFile(configFile, 'utf8'), configFile);
  const folderName = path.basename(path.resolve(modelDir));
  if (config?.name !== undefined && config.name !== folderName)
    throw new MeshError(
      'MESH_CONFIG',
      `${configFile} names model ${config.name}, but its folder is ${folderName} (Triton requires them to match)`,
    );
  if (folderName !== model) throw new MeshError('MESH_CONFIG', `the Triton model folder is ${folderName}, but --model is ${model}`);
  const entries = await readdir(modelDir, { withFileTypes: true });
  const versions = entries.filter((e) => e.isDirectory() && numericVersion(e.name)).map((e) => e.name);
  let chosen: string;
  if (version !== undefined) {
    if (!numericVersion(version))
      throw new MeshError(
        'MESH_CONFIG',
        `version folder ${JSON.stringify(version)} is not numerically named (Triton's versions are 1, 2, …; no leading 0)`,
      );
    if (!versions.includes(version))
      throw new MeshError('MESH_CONFIG', `${modelDir} has no version folder ${version} (it has ${versions.join(', ') || 'none'})`);
    chosen = version;
  } else {
    if (versions.length === 0) {
      const ignored = entries.filter((e) => e.isDirectory()).map((e) => e.name);
      throw new MeshError(
        'MESH_CONFIG',
        `${modelDir} has no numerically named version folder${ignored.length ? ` (${ignored.join(', ')} are not version numbers)` : ''}`,
      );
    }
    chosen = versions.sort((a, b) => Number(b) - Number(a))[0]!;
  }
  const filename = config?.defaultModelFilename ?? 'model.onnx';
  const file = path.join(modelDir, chosen, filename);
  const f = await exists(file);
  if (!f)
    throw new MeshError(
      'MESH_CONFIG',
      `${file} is missing (the model file of version ${chosen}${config?.defaultModelFilename ? ', from default_model_filename' : ''})`,
    );
  if (f.isDirectory()) throw new MeshError('MESH_CONFIG', `${file} is a folder (an ONNX model with external data): a bundle is one file`);
  return { layout: 'triton', file, model, version: chosen, ...(config ? { config } : {}) };
}

/**
 * The config's inputs against those the ONNX file declares: the same names, and where both give a size, the same
 * size (Triton puts a free batch dim in front of the config's dims when max_batch_size > 0).
 */
export function checkConfigAgainstModel(
  config: TritonConfig,
  declared: { name: string; dims: (number | string | null)[] | null }[],
  file: string,
): void {
  const names = new Set(declared.map((d) => d.name));
  for (const input of config.inputs) {
    if (!names.has(input.name))
      throw new MeshError(
        'MESH_CONFIG',
        `config.pbtxt declares input ${input.name}, but ${file} has ${[...names].join(', ') || 'no input'}`,
      );
    const dims = declared.find((d) => d.name === input.name)!.dims;
    if (dims === null) continue;
    const expected = config.maxBatchSize > 0 ? [-1, ...input.dims] : input.dims;
    const same =
      dims.length === expected.length &&
      dims.every((d, i) => typeof d !== 'number' || expected[i] === -1 || d === expected[i] || (i === 0 && config.maxBatchSize > 0));
    if (!same)
      throw new MeshError(
        'MESH_CONFIG',
        `config.pbtxt gives input ${input.name} dims [${expected.join(', ')}], but ${file} declares [${dims.map((d) => d ?? '?').join(', ')}]`,
      );
  }
}
