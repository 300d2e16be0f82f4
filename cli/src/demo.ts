/**
 * `edge-mesh demo app`: the sample app of `edge-mesh up` as a command of its own, so that `up` runs it
 * as a separate process like every other part (docs/operations.md). It can also drive any running mesh.
 */
import path from 'node:path';
import { loadKeyFile } from '@edge-mesh/client';
import type { AppReady, AppSummary } from '@edge-mesh/demo';
import { MeshError } from '@edge-mesh/protocol';
import { type Command, Option } from 'commander';
import { cliLogger, LOG_LEVELS } from './log.ts';
import { brokerAccessFlags, brokerAccessFrom, collect, positiveInt, positiveNumber } from './options.ts';
import { report, stopSignal } from './supervised.ts';

const keyWarnings = { warn: (message: string) => process.stderr.write(`edge-mesh: warning: ${message}\n`) };

export function registerDemoCommands(program: Command): void {
  const demo = program.command('demo').description('pieces of the local mesh that `edge-mesh up` runs, usable on their own');

  demo
    .command('app')
    .description(
      'run the sample app against a running mesh: a steady stream of requests over the models, with latency reports on stdout every few seconds',
    )
    .option('--broker <urls>', 'broker URL, or a comma-separated list to fail over through', 'mqtt://127.0.0.1:1883')
    .option(
      '--key <file>',
      'the app key file (edge-mesh keys new --role app), admitted by the operator. Without it: an ephemeral key, which only an open broker accepts',
    )
    .option('--router <id>', 'ask this router for route leases (direct mode) instead of choosing agents locally')
    .option(
      '--http <url>',
      "the router's HTTP API: every --http-every-th request goes through its KServe v2 endpoint, as a thin client's would",
    )
    .option('--http-every <n>', 'with --http: which share of the requests goes over HTTP', positiveInt, 10)
    .option(
      '--http-json',
      "with --http: send and ask for JSON tensors; by default they go in KServe's binary tensor extension, as Triton's HTTP client sends them",
    )
    .option(
      '--http-api-key-file <file>',
      "with --http: file holding the API key the router's HTTP API asks for (sent as Authorization: Bearer)",
    )
    .option('--models <names>', 'models to send to, comma-separated', (v: string) => v.split(',').filter(Boolean), [
      'kws',
      'vad',
      'ocr-cls',
      'ocr-det',
    ])
    .option('--agents <n>', 'send nothing until this many agents serve every model (their signed statuses seen)', positiveInt, 1)
    .option('--wait-ms <ms>', 'how long to wait for them', positiveInt, 60_000)
    .option('--rate <rps>', 'requests per second', positiveNumber, 40)
    .option('--duration <seconds>', 'stop by itself after sending this long (default: until Ctrl-C)', positiveNumber)
    .option('--report-every <seconds>', 'seconds between reports', positiveNumber, 5)
    .option('--label <id=name>', 'show an agent under a local name in the reports (repeatable)', collect, [])
    .option('--json', 'print one summary JSON object as the last line', false)
    .option('--escrow <address>', 'pay for the requests with vouchers for this MeshEscrow (needs --chain-id and an EVM key)')
    .option('--chain-id <id>', 'the chain id of that escrow', positiveInt)
    .option('--evm-key <file>', "file with the payer's 0x-hex EVM private key (env MESH_EVM_KEY holds the key itself)")
    .option('--rpc <url>', "EVM JSON-RPC URL, to check agents' payouts in the escrow's registry (env MESH_RPC_URL)")
    .option('--data <dir>', 'folder for the payment lanes', path.join('.mesh-data', 'app'))
    .addOption(new Option('--log-level <level>', 'log level (logs go to stderr)').choices(LOG_LEVELS).default('warn'))
    .action(async (opts) => {
      const labels = new Map<string, string>();
      for (const spec of opts.label as string[]) {
        const eq = spec.indexOf('=');
        if (eq < 1) throw new MeshError('MESH_CONFIG', `--label ${JSON.stringify(spec)}: expected AGENT_ID=NAME`);
        labels.set(spec.slice(0, eq), spec.slice(eq + 1));
      }
      const identity = opts.key ? await loadKeyFile(opts.key, 'app', keyWarnings) : undefined;
      let payment: import('@edge-mesh/sdk').PaymentOptions | undefined;
      if (opts.escrow !== undefined) {
        if (opts.chainId === undefined) throw new MeshError('MESH_CONFIG', '--escrow needs --chain-id');
        const { loadEvmKey } = await import('./chain.ts');
        const key = await loadEvmKey(opts.evmKey);
        if (key === undefined) throw new MeshError('MESH_CONFIG', '--escrow needs --evm-key FILE or MESH_EVM_KEY (the payer)');
        const { ethers } = await import('ethers');
        if (!ethers.isAddress(opts.escrow)) throw new MeshError('MESH_CONFIG', `--escrow is not an EVM address: ${opts.escrow}`);
        const rpc = opts.rpc ?? process.env.MESH_RPC_URL;
        if (!rpc) throw new MeshError('MESH_CONFIG', '--escrow needs --rpc URL or MESH_RPC_URL (payouts are checked in the escrow)');
        const provider = new ethers.JsonRpcProvider(rpc, BigInt(opts.chainId), {
          staticNetwork: ethers.Network.from(BigInt(opts.chainId)),
          batchMaxCount: 1,
        });
        payment = {
          signer: new ethers.Wallet(key, provider),
          domain: { chainId: BigInt(opts.chainId), escrow: opts.escrow },
          dataDir: path.resolve(opts.data),
        };
      }
      const brokerAccess = await brokerAccessFrom(opts);
      let httpKey: string | undefined;
      if (opts.httpApiKeyFile !== undefined) {
        const { readFile } = await import('node:fs/promises');
        httpKey = (await readFile(opts.httpApiKeyFile, 'utf8')).trim();
      }
      const logger = cliLogger(opts.logLevel);
      const stop = stopSignal();
      const { runSampleApp } = await import('@edge-mesh/demo');
      const summary: AppSummary = await runSampleApp(
        {
          brokerUrl: opts.broker,
          ...(identity ? { identity } : {}),
          ...(opts.router ? { router: opts.router } : {}),
          ...(opts.http ? { httpUrl: opts.http, httpEvery: opts.httpEvery, httpJson: opts.httpJson === true } : {}),
          ...(httpKey ? { httpAuthorization: () => `Bearer ${httpKey}` } : {}),
          brokerAccess,
          models: opts.models,
          agents: opts.agents,
          waitMs: opts.waitMs,
          ratePerS: opts.rate,
          ...(opts.duration !== undefined ? { durationS: opts.duration } : {}),
          reportEveryS: opts.reportEvery,
          ...(payment ? { payment } : {}),
          agentLabel: (id) => labels.get(id) ?? id,
          logger,
          print: (text) => process.stdout.write(`${text}\n`),
          onReady: async (ready) => {
            logger.info(ready, 'sending');
            await report<AppReady>('ready', ready);
          },
        },
        stop,
      );
      await report<AppSummary>('summary', summary);
      if (opts.json) process.stdout.write(`${JSON.stringify(summary)}\n`);
    });
  brokerAccessFlags(demo.commands.find((c) => c.name() === 'app')!);
}
