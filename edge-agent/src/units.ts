/**
 * Jobs that run in units (docs/agent.md, "Models that run in units"): a model whose manifest sets
 * `units` takes inputs whose leading dimension counts the units of the job, N of them, 1 ≤ N ≤
 * `maxUnits`. Each unit is one run of the model on row i of every input (leading dimension 1, as the
 * model declares it); the job's outputs are the units' outputs in order along the leading dimension.
 * The agent reports progress as units complete (requests.ts), which is what progress receipts charge.
 */
import { MeshError, type Tensor, type TypedArray } from '@edge-mesh/protocol';
import { checkInputs } from './models.ts';
import type { LoadedModel } from './worker-protocol.ts';

export interface UnitSpec {
  maxUnits: number;
  /** A progress message (and on a paid request a `partial` receipt) after this many more units are done. */
  progressEvery: number;
}

/** Where a job that runs in units stands. */
export interface UnitRun {
  /** Units the request asked for. */
  total: number;
  every: number;
  /** Units whose run returned. */
  done: number;
  /** Units whose outputs went out in progress messages. */
  reported: number;
  /** Units done when the sender's cancel arrived (undefined: not cancelled). */
  atCancel?: number;
  /** Each done unit's outputs. */
  parts: Record<string, Tensor>[];
  /** Sum of the units' run times. */
  execMs: number;
}

/**
 * The number of units of a request for a model that runs in units, checking its inputs: every input has
 * the same leading dimension N, 1 ≤ N ≤ maxUnits, and with N taken as 1 the inputs are what the model
 * declares (checkInputs). Throws MESH_BAD_INPUT.
 */
export function unitsOf(model: LoadedModel, spec: UnitSpec, inputs: Record<string, Tensor>): number {
  let n: number | undefined;
  const asOneUnit: Record<string, Tensor> = {};
  for (const [name, t] of Object.entries(inputs)) {
    const rows = t.shape[0];
    if (rows === undefined || (n !== undefined && rows !== n)) {
      throw new MeshError(
        'MESH_BAD_INPUT',
        `model ${model.name} runs in units: every input's leading dimension counts them, and they differ`,
      );
    }
    n = rows;
    asOneUnit[name] = { ...t, shape: [1, ...t.shape.slice(1)] };
  }
  if (n === undefined || n < 1 || n > spec.maxUnits) {
    throw new MeshError('MESH_BAD_INPUT', `model ${model.name} runs 1 to ${spec.maxUnits} units a request; got ${String(n)}`);
  }
  checkInputs(model, asOneUnit);
  return n;
}

/** Rows [from, to) of a tensor along its leading dimension, copied (the executor may transfer input buffers). */
function rows(t: Tensor, from: number, to: number): Tensor {
  const total = t.shape[0]!;
  const per = total === 0 ? 0 : t.data.length / total;
  return { dtype: t.dtype, shape: [to - from, ...t.shape.slice(1)], data: t.data.slice(from * per, to * per) as TypedArray };
}

/** The inputs of unit `i`: row i of every input. */
export function unitInputs(inputs: Record<string, Tensor>, i: number): Record<string, Tensor> {
  const out: Record<string, Tensor> = {};
  for (const [name, t] of Object.entries(inputs)) out[name] = rows(t, i, i + 1);
  return out;
}

/** The units' outputs joined along the leading dimension, in unit order. */
export function joinUnits(parts: readonly Record<string, Tensor>[]): Record<string, Tensor> {
  const out: Record<string, Tensor> = {};
  const first = parts[0];
  if (!first) return out;
  for (const name of Object.keys(first)) {
    const pieces = parts.map((p) => p[name]);
    if (pieces.some((p) => !p || p.dtype !== first[name]!.dtype)) {
      throw new MeshError('MESH_INFERENCE_FAILED', `the units of a job returned different outputs (${name})`);
    }
    const length = pieces.reduce((sum, p) => sum + p!.data.length, 0);
    const Ctor = first[name]!.data.constructor as new (n: number) => TypedArray;
    const data = new Ctor(length);
    let offset = 0;
    for (const p of pieces) {
      (data as unknown as { set(a: ArrayLike<unknown>, o: number): void }).set(p!.data as ArrayLike<unknown>, offset);
      offset += p!.data.length;
    }
    const lead = pieces.reduce((sum, p) => sum + (p!.shape[0] ?? 1), 0);
    out[name] = { dtype: first[name]!.dtype, shape: [lead, ...first[name]!.shape.slice(1)], data };
  }
  return out;
}
