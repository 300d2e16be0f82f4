/**
 * `npm run bench -- pipeline [--quick] [--n N] [--ocr-n N]`: what running a pipeline through the mesh adds over
 * running the same stages in one process.
 *
 * mesh:   three processes besides this one: `edge-mesh broker`, agent A (`oww-melspectrogram`, `oww-hey-jarvis`,
 *         `ocr-det`) and agent B (`oww-embedding`, `ocr-cls`, `ocr-rec`), each `--workers 1`. This process runs
 *         the SDK's `mesh.pipeline()`: the wake-word pipeline's three model stages alternate A, B, A, each an
 *         ordinary request over MQTT (QoS 1), the steps between them here.
 * direct: the same pipeline definition, the same steps, in this process, each model run with onnxruntime-node
 *         (one intra-op thread, as the agents run them) through `runPipeline` with a local `infer`.
 * Paired: run i goes through the mesh, then directly, on the same 2 s of audio, so both see the same moment's
 * machine load; after 20 warm-up pairs, n timed pairs (default 400, quick 100). overhead = mesh − direct per
 * pair; reported as the median and p99 of those differences and per model stage (3). The OCR pipeline (three
 * model stages too, a 2-line image) is measured the same way with --ocr-n pairs (default 40, quick 10).
 */
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { ocrPipeline, ocrText, round, runPipeline, summarize } from '@edge-mesh/client';
import { ensurePipelineModelsFolder, localStages, ocrDictionary, textImage } from '@edge-mesh/demo';
import type { Tensor } from '@edge-mesh/protocol';
import { connect } from '@edge-mesh/sdk';
import {
  admitted,
  assertBuilt,
  type BenchContext,
  type BenchResult,
  benchTempDir,
  environment,
  ROOT,
  startAgentProc,
  startBrokerProc,
} from './lib.ts';

const MODELS = path.join(ROOT, '.mesh-data', 'pipeline-models');
const AGENT_A = ['oww-melspectrogram', 'oww-hey-jarvis', 'ocr-det'];
const AGENT_B = ['oww-embedding', 'ocr-cls', 'ocr-rec'];

async function subset(models: readonly string[], name: string): Promise<string> {
  const manifest = JSON.parse(await readFile(path.join(MODELS, 'manifest.json'), 'utf8')) as { models: { name: string; file: string }[] };
  const dir = benchTempDir(name);
  const picked = manifest.models.filter((m) => models.includes(m.name));
  for (const m of picked) await copyFile(path.join(MODELS, m.file), path.join(dir, m.file));
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ models: picked }));
  return dir;
}

/** 2 s of a deterministic voiced signal, int16 (the test suite's synthetic audio). */
function audio(): Tensor {
  const n = 32_000;
  const out = new Int16Array(n);
  let phase = 0;
  for (let i = 0; i < n; i++) {
    phase += (2 * Math.PI * (140 + 60 * Math.sin((2 * Math.PI * 0.7 * i) / 16_000))) / 16_000;
    let v = 0;
    for (let k = 1; k <= 8; k++) v += Math.sin(k * phase) / k;
    out[i] = Math.round(6_000 * Math.sin((Math.PI * i) / n) ** 2 * v);
  }
  return { dtype: 'int16', shape: [1, n], data: out };
}

const p99 = (values: number[]) => summarize(values).p99;

export async function run({ quick, log, args }: BenchContext): Promise<BenchResult> {
  assertBuilt(['protocol', 'client', 'edge-agent', 'broker', 'sdk', 'cli', 'demo']);
  const n = Number(args.n ?? (quick ? 100 : 400));
  const ocrN = Number(args['ocr-n'] ?? (quick ? 10 : 40));
  await ensurePipelineModelsFolder(MODELS, { logger: { info: (m) => log(m) } });
  const { url } = await startBrokerProc();
  const a = await admitted(url, 'agent');
  const b = await admitted(url, 'agent');
  await Promise.all([
    startAgentProc({
      url,
      keyFile: a.keyFile,
      id: a.identity.id,
      modelsDir: await subset(AGENT_A, 'agent-a'),
      workers: 1,
      name: 'agent A',
    }),
    startAgentProc({
      url,
      keyFile: b.keyFile,
      id: b.identity.id,
      modelsDir: await subset(AGENT_B, 'agent-b'),
      workers: 1,
      name: 'agent B',
    }),
  ]);
  log('broker and two agents up');
  const dictionary = ocrDictionary();
  const app = await admitted(url, 'app');
  const mesh = await connect({ brokerUrl: url, identity: app.identity, pipelines: [ocrPipeline({ dictionary })] });
  const local = await localStages(MODELS, [...AGENT_A, ...AGENT_B]);
  try {
    for (const m of [...AGENT_A, ...AGENT_B]) await mesh.waitForModel(m, 30_000);
    const measure = async (
      name: string,
      inputs: Record<string, Tensor>,
      pairs: number,
      warmup: number,
      def = mesh.pipelines().find((p) => p.name === name)!,
    ) => {
      const viaMesh: number[] = [];
      const direct: number[] = [];
      const diffs: number[] = [];
      const agentMs: number[] = [];
      const wayMs = new Map<string, number[]>();
      const agents = new Set<string>();
      for (let i = 0; i < warmup + pairs; i++) {
        let t0 = performance.now();
        const r = await mesh.pipeline(name, inputs, { deadlineMs: 10_000 });
        const m = performance.now() - t0;
        t0 = performance.now();
        await runPipeline(def, inputs, { deadlineMs: 10_000, infer: local.infer });
        const d = performance.now() - t0;
        if (i < warmup) continue;
        for (const s of r.stages) agents.add(`${s.stage}@${s.agentId === a.identity.id ? 'A' : 'B'}`);
        viaMesh.push(m);
        direct.push(d);
        diffs.push(m - d);
        agentMs.push(r.stages.reduce((sum, s) => sum + (s.execMs ?? 0) + (s.queueMs ?? 0), 0));
        for (const s of r.stages) {
          const way = wayMs.get(s.stage) ?? [];
          way.push(s.ms - (s.execMs ?? 0) - (s.queueMs ?? 0));
          wayMs.set(s.stage, way);
        }
      }
      log(`${name}: ${pairs} pairs, mesh p50 ${round(summarize(viaMesh).p50, 2)} ms, direct p50 ${round(summarize(direct).p50, 2)} ms`);
      // Per stage: the request's time at the orchestrator minus the agent's queue and compute (transfers, hops, checks).
      const way = Object.fromEntries([...wayMs].map(([stage, v]) => [stage, round(summarize(v).p50, 3)]));
      return { viaMesh, direct, diffs, agentMs, way, stages: [...agents] };
    };
    const ww = await measure('wakeword', { audio: audio() }, n, 20);
    const image = textImage(['Pipelines on the edge', 'Hello, world']);
    const read = ocrText((await mesh.pipeline('ocr', { image }, { deadlineMs: 30_000 })).outputs);
    const ocr = await measure('ocr', { image }, ocrN, 2);
    const stagesOf = 3;
    return {
      pipeline: 'wakeword',
      pipeline_p50_ms: round(summarize(ww.viaMesh).p50, 3),
      pipeline_p99_ms: round(p99(ww.viaMesh), 3),
      direct_p50_ms: round(summarize(ww.direct).p50, 3),
      direct_p99_ms: round(p99(ww.direct), 3),
      overhead_p50_ms: round(summarize(ww.diffs).p50, 3),
      overhead_p99_ms: round(p99(ww.diffs), 3),
      overhead_per_stage_p50_ms: round(summarize(ww.diffs).p50 / stagesOf, 3),
      // What the agents said their queues and runs took, summed over the stages: the rest of pipeline_p50_ms is
      // transfers, MQTT and the steps.
      agents_queue_exec_p50_ms: round(summarize(ww.agentMs).p50, 3),
      stage_way_p50_ms: ww.way,
      model_stages: stagesOf,
      stages: ww.stages,
      runs: n,
      ocr: {
        text: read,
        pipeline_p50_ms: round(summarize(ocr.viaMesh).p50, 3),
        direct_p50_ms: round(summarize(ocr.direct).p50, 3),
        overhead_p50_ms: round(summarize(ocr.diffs).p50, 3),
        overhead_p99_ms: round(p99(ocr.diffs), 3),
        stage_way_p50_ms: ocr.way,
        runs: ocrN,
        stages: ocr.stages,
      },
      env: environment(),
    };
  } finally {
    await local.close();
    await mesh.close();
  }
}
