/**
 * The voucher relay on the command line (docs/settlement.md, "The relay"): `edge-mesh relay` runs one on
 * its own HTTP server, and `edge-mesh router --relay-evm-key FILE` mounts the same routes on the router's
 * HTTP API. The relay's account pays the settlement gas and earns the vouchers' relayer fees.
 */
import { MeshError } from '@edge-mesh/protocol';
import { type Command, Option } from 'commander';
import { loadEvmKey } from './chain.ts';
import { cliLogger, LOG_LEVELS } from './log.ts';
import { nonNegativeInt, positiveInt } from './options.ts';
import { stopSignal } from './supervised.ts';

/** Relay flags shared by `edge-mesh relay` and `edge-mesh router`. */
export function relayFlags(cmd: Command): Command {
  return cmd
    .option(
      '--relay-evm-key <file>',
      'relay vouchers (POST /v1/relay/vouchers) from the account in this file: it pays the gas and earns the fees (env MESH_RELAY_EVM_KEY holds the key itself)',
    )
    .option('--relay-min-fee-micros <n>', 'least relayer fee a voucher must pay this relay when settled, µUSD', positiveInt, 1)
    .option('--relay-batch-ms <ms>', 'how long accepted vouchers wait to go out together, per agent', positiveInt, 2_000)
    .option(
      '--relay-receipt-timeout-ms <ms>',
      'how long a settlement transaction is waited for before it is sent again on its nonce with a higher fee (default 180000)',
      positiveInt,
    );
}

/** The relay's EVM key from --relay-evm-key FILE or MESH_RELAY_EVM_KEY; undefined when neither is given. */
async function relayKey(file: string | undefined): Promise<string | undefined> {
  if (file !== undefined) return loadEvmKey(file);
  const text = process.env.MESH_RELAY_EVM_KEY?.trim();
  if (!text) return undefined;
  const key = text.startsWith('0x') ? text : `0x${text}`;
  if (!/^0x[0-9a-fA-F]{64}$/.test(key)) throw new MeshError('MESH_CONFIG', 'MESH_RELAY_EVM_KEY does not hold a 32-byte hex private key');
  return key;
}

/** The router's `http.relay` options, or undefined when no relay key is given. */
export async function relayOptionsFrom(opts: {
  relayEvmKey?: string;
  relayMinFeeMicros: number;
  relayBatchMs: number;
  relayReceiptTimeoutMs?: number;
  rpc?: string;
  escrow?: string;
}): Promise<import('@edge-mesh/router').RelayOptions | undefined> {
  const key = await relayKey(opts.relayEvmKey);
  if (key === undefined) return undefined;
  const rpc = opts.rpc ?? process.env.MESH_RPC_URL;
  const escrow = opts.escrow ?? process.env.MESH_ESCROW;
  if (!rpc || !escrow) throw new MeshError('MESH_CONFIG', 'a relay needs --rpc and --escrow (or MESH_RPC_URL and MESH_ESCROW)');
  const { ethers } = await import('ethers');
  const provider = new ethers.JsonRpcProvider(rpc, undefined, { batchMaxCount: 1, cacheTimeout: -1, pollingInterval: 200 });
  return {
    runner: new ethers.Wallet(key, provider),
    escrow,
    minFeeMicros: opts.relayMinFeeMicros,
    batchMs: opts.relayBatchMs,
    ...(opts.relayReceiptTimeoutMs !== undefined ? { receiptTimeoutMs: opts.relayReceiptTimeoutMs } : {}),
  };
}

export function registerRelayCommand(program: Command): void {
  relayFlags(
    program
      .command('relay')
      .description(
        "settle other agents' vouchers for their relayer fees: POST /v1/relay/vouchers on its own HTTP server (the same routes as edge-mesh router --relay-evm-key)",
      )
      .option('--rpc <url>', "EVM JSON-RPC URL of the escrow's chain (env MESH_RPC_URL)")
      .option('--escrow <address>', 'the MeshEscrow to settle on (env MESH_ESCROW)')
      .option('--port <port>', 'HTTP port (0 for any free port)', nonNegativeInt, 8090)
      .option('--host <host>', 'HTTP address', '127.0.0.1')
      .addOption(new Option('--log-level <level>', 'log level (logs go to stderr)').choices(LOG_LEVELS).default('info')),
  ).action(async (opts) => {
    const relay = await relayOptionsFrom(opts);
    if (!relay) throw new MeshError('MESH_CONFIG', 'edge-mesh relay needs --relay-evm-key FILE or MESH_RELAY_EVM_KEY');
    const logger = cliLogger(opts.logLevel);
    const stop = stopSignal();
    const { startRelayServer } = await import('@edge-mesh/router');
    const server = await startRelayServer({ ...relay, logger, port: opts.port, host: opts.host });
    logger.info({ url: server.url, relay: server.relay.address }, 'relay up');
    process.stdout.write(`relay ${server.relay.address} serving ${server.url}\n`);
    const signal = await stop;
    logger.info({ signal, counters: server.relay.counters }, 'stopping');
    await server.close();
  });
}
