/**
 * Pipelines (docs/pipelines.md): a named graph of models, an ensemble in Triton's words, run stage by stage
 * within one deadline. A `model` stage is an ordinary request through the caller's `infer` (the SDK's or the
 * router's request engine), so it goes to whichever agent is best for that model, is paid and receipted like
 * any request, and may land on a different agent from the stage before. A `step` stage is a deterministic
 * function in the orchestrating process: the pre- and post-processing between models that is not an ONNX
 * model (windowing, box finding, decoding).
 *
 * What the orchestrator does not trust: the caller's inputs (checked against the declared inputs) and every
 * stage agent's outputs (checked against the stage's declared outputs, so a wrong-shaped, wrong-typed or
 * oversized tensor from a dishonest agent never reaches the next stage). A stage whose agent answered with
 * outputs that fail the check is tried once more on another agent when the deadline allows; the failed
 * attempt is reported in `rejected` so the caller can refuse to pay it (the SDK does).
 *
 * Beyond Triton's ensembles: a model stage may escalate. When its outputs say the result is unsure (the
 * `when` test) and at least `minRemainingMs` remain, the same inputs go to a bigger model, usually served by
 * stronger nodes; its answer replaces the first when it passes the same checks, else the first stands.
 */
import { checkTensor, type DType, MeshError, type Tensor } from '@edge-mesh/protocol';

/** A tensor's declared form: dtype, and per dimension a size or null for any. */
export interface TensorSpec {
  dtype: DType;
  shape: readonly (number | null)[];
  /** Upper bound on elements (default 1 << 22). */
  maxElements?: number;
}

/** Send the same inputs to a bigger model when the first answer is unsure and time allows. */
export interface Escalation {
  model: string;
  /** True when the stage's outputs (by model output name) are unsure enough to ask the bigger model. */
  when: (outputs: Readonly<Record<string, Tensor>>) => boolean;
  /** Escalate only when at least this much of the deadline is left, ms (default 0). */
  minRemainingMs?: number;
  /** Time kept back for the stages after this one: the bigger model gets what is left minus this, ms (default 0). */
  reserveMs?: number;
}

export interface ModelStage {
  kind: 'model';
  /** Unique within the pipeline; names the stage in results and errors. */
  name: string;
  model: string;
  /** Model input name → the pipeline tensor fed to it. */
  inputs: Readonly<Record<string, string>>;
  /** Model output name → the pipeline tensor it becomes, with the form an honest agent returns. */
  outputs: Readonly<Record<string, { as: string; spec: TensorSpec }>>;
  /**
   * A further check of an answer beyond each output's form, across inputs and outputs (one embedding per
   * window, say); throws to refuse the answer.
   */
  check?: (inputs: Readonly<Record<string, Tensor>>, outputs: Readonly<Record<string, Tensor>>) => void;
  /**
   * Outputs to use without asking any agent, when the inputs leave nothing to compute (no text box found, say):
   * no request is sent and nothing is paid. Undefined: ask.
   */
  skip?: (inputs: Readonly<Record<string, Tensor>>) => Record<string, Tensor> | undefined;
  escalate?: Escalation;
}

export interface StepStage {
  kind: 'step';
  name: string;
  /** The pipeline tensors the step reads. */
  inputs: readonly string[];
  /** The pipeline tensors it writes. */
  outputs: readonly string[];
  run: (tensors: Readonly<Record<string, Tensor>>) => Record<string, Tensor>;
}

export type PipelineStage = ModelStage | StepStage;

export interface PipelineDefinition {
  name: string;
  version: string;
  description?: string;
  inputs: Readonly<Record<string, TensorSpec>>;
  /** Pipeline tensors returned to the caller. */
  outputs: readonly string[];
  stages: readonly PipelineStage[];
}

/**
 * What the orchestrator needs from a request path: one routed, paid request; the agents to avoid, if any. A path
 * that can check an answer before paying for it calls `check` on the outputs and, when it throws, refuses the
 * answer's receipt and fails the request with MESH_BAD_TENSOR carrying `details.refused` 'outputs' and
 * `details.agentId` (the SDK does); the orchestrator checks every answer again either way.
 */
export type StageInfer = (
  model: string,
  inputs: Record<string, Tensor>,
  options: { deadlineMs: number; excludeAgents?: ReadonlySet<string>; check?: (outputs: Record<string, Tensor>) => void },
) => Promise<{ outputs: Record<string, Tensor>; agentId: string; requestId: string; execMs?: number; queueMs?: number }>;

export interface StageRecord {
  stage: string;
  model: string;
  agentId: string;
  requestId: string;
  ms: number;
  /** The serving agent's compute and queue time, as it reported them (absent when the request path gives none). */
  execMs?: number;
  queueMs?: number;
  /** Set on an escalated stage: the model first asked, whose answer was unsure. */
  escalatedFrom?: string;
}

/** An answered request whose outputs failed the stage's check: the work is refused. */
export interface RejectedAttempt {
  stage: string;
  model: string;
  agentId: string;
  requestId: string;
  error: MeshError;
}

export interface PipelineResult {
  pipeline: string;
  outputs: Record<string, Tensor>;
  /** One record per model stage, in order: the answer that was used. */
  stages: StageRecord[];
  /** Answers refused for failing their stage's check (not used, and not to be paid). */
  rejected: RejectedAttempt[];
  /** Escalations tried whose answer failed or came too late (the first answer stood). */
  escalationsFailed: { stage: string; model: string; error: MeshError }[];
  totalMs: number;
  /** Every tensor the pipeline made, stage outputs included, when `intermediates` was asked for. */
  tensors?: Record<string, Tensor>;
}

export interface RunPipelineOptions {
  deadlineMs: number;
  infer: StageInfer;
  /** Called for each refused answer as soon as it is refused (the SDK refuses its receipt). */
  onRejected?: (rejected: RejectedAttempt) => void;
  /** Return every intermediate tensor too (`tensors`), to check stages one by one. */
  intermediates?: boolean;
  now?: () => number;
}

const DEFAULT_MAX_ELEMENTS = 1 << 22;

/** Throws MESH_BAD_TENSOR (MESH_TOO_LARGE past the element bound) unless `tensor` has the declared form. */
export function checkTensorSpec(name: string, tensor: Tensor | undefined, spec: TensorSpec): Tensor {
  if (tensor === undefined) throw new MeshError('MESH_BAD_TENSOR', `tensor ${name} is missing`, { details: { tensor: name } });
  checkTensor(name, tensor, spec.maxElements ?? DEFAULT_MAX_ELEMENTS);
  if (tensor.dtype !== spec.dtype) {
    throw new MeshError('MESH_BAD_TENSOR', `tensor ${name}: dtype ${tensor.dtype}, expected ${spec.dtype}`, { details: { tensor: name } });
  }
  const fits = tensor.shape.length === spec.shape.length && spec.shape.every((d, i) => d === null || d === tensor.shape[i]);
  if (!fits) {
    const want = spec.shape.map((d) => (d === null ? '?' : d)).join(',');
    throw new MeshError('MESH_BAD_TENSOR', `tensor ${name}: shape [${tensor.shape.join(',')}], expected [${want}]`, {
      details: { tensor: name },
    });
  }
  return tensor;
}

/** Checks a definition once: unique stage names, every tensor produced before it is read. Throws MESH_CONFIG. */
export function validatePipeline(def: PipelineDefinition): PipelineDefinition {
  const bad = (msg: string) => new MeshError('MESH_CONFIG', `pipeline ${def.name}: ${msg}`);
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(def.name)) throw bad('the name must be 1-64 letters, digits, ".", "_" or "-"');
  const known = new Set(Object.keys(def.inputs));
  const names = new Set<string>();
  for (const stage of def.stages) {
    if (names.has(stage.name)) throw bad(`two stages are named ${stage.name}`);
    names.add(stage.name);
    const reads = stage.kind === 'model' ? Object.values(stage.inputs) : stage.inputs;
    for (const t of reads) if (!known.has(t)) throw bad(`stage ${stage.name} reads ${t} before any stage writes it`);
    const writes = stage.kind === 'model' ? Object.values(stage.outputs).map((o) => o.as) : stage.outputs;
    for (const t of writes) known.add(t);
  }
  for (const t of def.outputs) if (!known.has(t)) throw bad(`output ${t} is written by no stage`);
  return def;
}

/** The inputs `def` takes, each checked against its spec; an input it does not take is MESH_BAD_TENSOR. */
export function checkPipelineInputs(def: PipelineDefinition, inputs: Record<string, Tensor>): Record<string, Tensor> {
  const tensors: Record<string, Tensor> = {};
  for (const [name, spec] of Object.entries(def.inputs)) {
    tensors[name] = checkTensorSpec(`${def.name}.${name}`, inputs[name], spec);
  }
  for (const name of Object.keys(inputs)) {
    if (!Object.hasOwn(def.inputs, name)) {
      throw new MeshError('MESH_BAD_TENSOR', `pipeline ${def.name} has no input ${name}`, { details: { pipeline: def.name } });
    }
  }
  return tensors;
}

/** Runs `def` on `inputs`: model stages through `infer`, steps here, all within `deadlineMs`. */
export async function runPipeline(
  def: PipelineDefinition,
  inputs: Record<string, Tensor>,
  { deadlineMs, infer, onRejected, intermediates = false, now = () => performance.now() }: RunPipelineOptions,
): Promise<PipelineResult> {
  const startedAt = now();
  const deadlineAt = startedAt + deadlineMs;
  const tensors = checkPipelineInputs(def, inputs);
  const stages: StageRecord[] = [];
  const rejected: RejectedAttempt[] = [];
  const escalationsFailed: PipelineResult['escalationsFailed'] = [];
  const remaining = () => deadlineAt - now();
  const expired = (stage: string) =>
    new MeshError('MESH_DEADLINE_EXCEEDED', `pipeline ${def.name}: the deadline passed before stage ${stage}`, {
      details: { pipeline: def.name, stage },
    });

  /** The stage's outputs from `outputs` (by model output name) when they have the declared form; throws otherwise. */
  const checked = (stage: ModelStage, feed: Record<string, Tensor>, outputs: Record<string, Tensor>) => {
    const out: Record<string, Tensor> = {};
    for (const [outName, { spec }] of Object.entries(stage.outputs)) {
      out[outName] = checkTensorSpec(`${stage.name}.${outName}`, outputs[outName], spec);
    }
    stage.check?.(feed, out);
    return out;
  };

  /** One answer for `model` whose outputs pass the stage's check; a second agent when the first lies. */
  const askChecked = async (stage: ModelStage, model: string, feed: Record<string, Tensor>, reserveMs = 0) => {
    const exclude = new Set<string>();
    const refuse = (agentId: string, requestId: string, cause: unknown) => {
      const error = new MeshError(
        'MESH_BAD_TENSOR',
        `pipeline ${def.name}, stage ${stage.name}: agent ${agentId} answered ${model} with ${(cause as Error).message}`,
        { cause, details: { pipeline: def.name, stage: stage.name, agentId } },
      );
      const record = { stage: stage.name, model, agentId, requestId, error };
      rejected.push(record);
      onRejected?.(record);
      exclude.add(agentId);
      return error;
    };
    for (let tries = 0; ; tries++) {
      const left = remaining() - reserveMs;
      if (left <= 0) throw expired(stage.name);
      const sentAt = now();
      let answer: Awaited<ReturnType<StageInfer>>;
      try {
        answer = await infer(model, feed, {
          deadlineMs: left,
          check: (outputs) => void checked(stage, feed, outputs),
          ...(exclude.size ? { excludeAgents: exclude } : {}),
        });
      } catch (err) {
        const details =
          err instanceof MeshError ? (err.details as { refused?: string; agentId?: string; requestId?: string } | undefined) : undefined;
        if (details?.refused === 'outputs' && details.agentId) {
          // Refused, and not paid, by the request path itself: try another agent once.
          const error = refuse(details.agentId, details.requestId ?? '', err);
          if (tries >= 1 || remaining() <= 0) throw error;
          continue;
        }
        // The refusal says more than "no other agent": report it, with why the second try failed.
        const refused = rejected.findLast((r) => r.stage === stage.name && r.model === model);
        if (refused && exclude.size > 0) {
          throw new MeshError('MESH_BAD_TENSOR', `${refused.error.message}; no honest answer after it: ${(err as Error).message}`, {
            cause: err,
            details: { ...refused.error.details, retryCode: err instanceof MeshError ? err.code : 'MESH_INTERNAL' },
          });
        }
        throw err;
      }
      try {
        return { ...answer, outputs: checked(stage, feed, answer.outputs), ms: now() - sentAt };
      } catch (err) {
        const error = refuse(answer.agentId, answer.requestId, err);
        if (tries >= 1 || remaining() <= 0) throw error;
      }
    }
  };

  for (const stage of def.stages) {
    if (remaining() <= 0) throw expired(stage.name);
    if (stage.kind === 'step') {
      const view: Record<string, Tensor> = {};
      for (const t of stage.inputs) view[t] = tensors[t]!;
      let produced: Record<string, Tensor>;
      try {
        produced = stage.run(view);
      } catch (err) {
        if (err instanceof MeshError) throw err;
        throw new MeshError('MESH_BAD_INPUT', `pipeline ${def.name}, step ${stage.name}: ${(err as Error).message}`, {
          cause: err,
          details: { pipeline: def.name, stage: stage.name },
        });
      }
      for (const t of stage.outputs) {
        if (!produced[t]) throw new MeshError('MESH_INTERNAL', `pipeline ${def.name}, step ${stage.name} did not produce ${t}`);
        tensors[t] = produced[t];
      }
      continue;
    }
    const feed: Record<string, Tensor> = {};
    for (const [modelInput, t] of Object.entries(stage.inputs)) feed[modelInput] = tensors[t]!;
    const skipped = stage.skip?.(feed);
    if (skipped) {
      for (const [outName, { as }] of Object.entries(stage.outputs)) tensors[as] = skipped[outName]!;
      continue;
    }
    let answer = await askChecked(stage, stage.model, feed);
    let escalatedFrom: string | undefined;
    const rule = stage.escalate;
    if (rule?.when(answer.outputs) && remaining() > (rule.minRemainingMs ?? 0)) {
      try {
        answer = await askChecked(stage, rule.model, feed, rule.reserveMs ?? 0);
        escalatedFrom = stage.model;
      } catch (err) {
        const error = err instanceof MeshError ? err : new MeshError('MESH_INTERNAL', (err as Error).message, { cause: err });
        escalationsFailed.push({ stage: stage.name, model: rule.model, error });
      }
    }
    for (const [outName, { as }] of Object.entries(stage.outputs)) tensors[as] = answer.outputs[outName]!;
    stages.push({
      stage: stage.name,
      model: escalatedFrom ? rule!.model : stage.model,
      agentId: answer.agentId,
      requestId: answer.requestId,
      ms: answer.ms,
      ...(answer.execMs !== undefined ? { execMs: answer.execMs } : {}),
      ...(answer.queueMs !== undefined ? { queueMs: answer.queueMs } : {}),
      ...(escalatedFrom ? { escalatedFrom } : {}),
    });
  }
  const outputs: Record<string, Tensor> = {};
  for (const t of def.outputs) outputs[t] = tensors[t]!;
  return {
    pipeline: def.name,
    outputs,
    stages,
    rejected,
    escalationsFailed,
    totalMs: now() - startedAt,
    ...(intermediates ? { tensors: { ...tensors } } : {}),
  };
}
