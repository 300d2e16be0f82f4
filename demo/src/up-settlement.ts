/**
 * Paid inference in `edge-mesh up`: a local Hardhat chain with the escrow and a mock stablecoin, the
 * sample app's lanes funded, each agent paid to its own payout address, and the figures for the `--json`
 * summary. Every agent but the last settles through its own relayer (paying its own gas); the last holds
 * no ETH at all and hands its vouchers to a voucher relay (router/relay.ts) that this process runs, which
 * pays the gas and earns the relayer fee the app's vouchers carry.
 *
 * Accounts come from the chain's development mnemonic: 0 deploys, 1 is the app's voucher key (the
 * signer of its lanes, a hot key that holds no money), 2 is the funding wallet that owns those lanes
 * (opened with the voucher key's consent; it alone could take money back), 3, 4, … are the agents'
 * payout addresses, and the one after them is the relay's account. The chain is new on every run, so the
 * payment stores live in a fresh folder under `<data>/` that is removed at the end.
 */
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import path from 'node:path';
import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { agentBindingMessage, type Identity, signBytes } from '@edge-mesh/protocol';
import { type RelayServer, startRelayServer } from '@edge-mesh/router';
import type { Logger } from 'pino';
import type { AgentSummary } from './parts.ts';

export interface UpSettlementSummary {
  /** Receipts the agents signed on the app's lanes (failed and timed-out work included, at 0). */
  receipts: number;
  /** What those receipts charge, in micro-dollars. */
  owed_micros: number;
  /** What the escrow paid the agents on chain by the end of the run. */
  settled_micros: number;
  /** Settle transactions the agents' relayers sent (the relay's not included). */
  settlement_txs: number;
  /** What the relay settled for the agent without gas, and the fees it earned. */
  relayed_micros: number;
  relay_fees_micros: number;
  relay_txs: number;
}

export interface UpSettlementOptions {
  dataDir: string;
  agents: number;
  logger: Logger;
  print: (line: string) => void;
  /** Relayer check period and maximum interval, short so that a 30 s demo settles several times. */
  checkEveryMs?: number;
  maxIntervalMs?: number;
  /** What each of the app's lanes is funded with (micro-dollars; default 100 USD). */
  fundMicros?: bigint;
}

/** Command-line arguments and environment for a part's `edge-mesh` command (EVM keys go in the environment). */
export interface PartPayment {
  args: string[];
  env: Record<string, string>;
}

export interface UpSettlement {
  readonly chain: LocalChain;
  readonly deployment: MeshDeployment;
  /** `edge-mesh agent` options: paid to its own payout address, settling through its own relayer or (the last) the relay. */
  agentPayment(index: number): PartPayment;
  /** `edge-mesh demo app` options: signs vouchers with the app's voucher key, on lanes the funding wallet owns. */
  appPayment(): PartPayment;
  /** `edge-mesh router` options: serve /v1/lanes and /v1/settlements from the escrow. */
  routerArgs(): string[];
  /**
   * Registers each agent's Ed25519 key for its payout address in the escrow (`registerAgent`, sent by the
   * payout account), so payers can check that a quoted payout is the agent's own.
   */
  registerAgents(agents: readonly Identity[]): Promise<void>;
  /** The figures of the summary, from what the agents reported as they stopped and from the chain. */
  summary(agents: readonly (AgentSummary | undefined)[]): Promise<UpSettlementSummary>;
  close(): Promise<void>;
}

const APP_ACCOUNT = 1;
const FUNDER_ACCOUNT = 2;
const FIRST_AGENT_ACCOUNT = 3;

export async function startUpSettlement(options: UpSettlementOptions): Promise<UpSettlement> {
  const { logger, print, agents } = options;
  const fund = options.fundMicros ?? 100_000_000n;
  const started = performance.now();
  const relayAccount = FIRST_AGENT_ACCOUNT + agents;
  const relayedAgent = agents - 1;
  const chain = await startLocalChain({ accounts: relayAccount + 1, log: (line) => logger.info(line) });
  let runDir: string | undefined;
  let relay: RelayServer | undefined;
  try {
    const deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
    const payouts = Array.from({ length: agents }, (_, i) => chain.accounts[FIRST_AGENT_ACCOUNT + i]!.toLowerCase());
    const appWallet = chain.wallet(APP_ACCOUNT);
    const app = await EscrowClient.connect({ runner: appWallet, escrow: deployment.escrow, token: deployment.token });
    const funderWallet = chain.wallet(FUNDER_ACCOUNT);
    const funder = await EscrowClient.connect({ runner: funderWallet, escrow: deployment.escrow, token: deployment.token });
    // The voucher key lets the funding wallet open its lanes; the money and the right to withdraw stay with the funder.
    const consent = await app.signOwnerConsent(funderWallet.address);
    await funder.mint(funderWallet.address, fund * BigInt(agents));
    for (const payout of payouts) await funder.fund(appWallet.address, payout, fund, { approveMax: true, consent });
    await mkdir(options.dataDir, { recursive: true });
    runDir = await mkdtemp(path.join(options.dataDir, 'payments-run-'));
    const dir = runDir;
    print(
      `local chain ${deployment.chainId} (pid ${chain.pid}) on ${chain.rpcUrl}: escrow ${deployment.escrow}; app voucher key ${appWallet.address}, its lanes owned by ${funderWallet.address} and funded ${Number(fund) / 1e6} USD per agent (${Math.round(performance.now() - started)} ms)`,
    );
    relay = await startRelayServer({
      runner: chain.wallet(relayAccount),
      escrow: deployment.escrow,
      batchMs: 500,
      logger: logger.child({ part: 'relay' }),
    });
    const relayServer = relay;
    print(`voucher relay ${relay.relay.address} on ${relay.url}: settles agent-${relayedAgent + 1}'s vouchers for their fee`);
    const domainArgs = ['--escrow', deployment.escrow, '--chain-id', deployment.chainId.toString()];
    const settleArgs = [
      '--settle-check-ms',
      String(options.checkEveryMs ?? 1_000),
      '--settle-interval',
      String((options.maxIntervalMs ?? 5_000) / 1000),
      '--settle-on-close',
    ];
    return {
      chain,
      deployment,
      agentPayment: (index) => ({
        args: [
          '--payout',
          payouts[index]!,
          ...domainArgs,
          '--data',
          path.join(dir, `agent-${index + 1}`),
          '--rpc',
          chain.rpcUrl,
          // The last agent has no EVM key and no gas: the relay settles for it.
          ...(index === relayedAgent ? ['--relay', relayServer.url, '--relay-wait-ms', '5000'] : ['--settle']),
          ...settleArgs,
          // The router's HTTP API and the bridge send unpaid requests (docs/settlement.md, "In `npm start`").
          '--serve-unpaid',
        ],
        env: index === relayedAgent ? ({} as Record<string, string>) : { MESH_EVM_KEY: chain.privateKeys[FIRST_AGENT_ACCOUNT + index]! },
      }),
      appPayment: () => ({
        args: [...domainArgs, '--rpc', chain.rpcUrl, '--data', path.join(dir, 'app')],
        env: { MESH_EVM_KEY: chain.privateKeys[APP_ACCOUNT]! },
      }),
      routerArgs: () => ['--rpc', chain.rpcUrl, '--escrow', deployment.escrow, '--from-block', String(deployment.deployBlock)],
      async registerAgents(identities) {
        const domain = { chainId: deployment.chainId, escrow: deployment.escrow };
        for (const [i, identity] of identities.entries()) {
          const payoutClient = await EscrowClient.connect({
            runner: chain.wallet(FIRST_AGENT_ACCOUNT + i),
            escrow: deployment.escrow,
            token: deployment.token,
          });
          const binding = signBytes(identity, agentBindingMessage(domain, payouts[i]!));
          await payoutClient.registerAgent(identity.publicKey, binding);
        }
        // Registered (one transaction from the payout account); from here on the relayed agent's payout holds no ETH.
        await chain.provider.send('hardhat_setBalance', [payouts[relayedAgent]!, '0x0']);
      },
      async summary(reports) {
        // What the relayed agent handed over as it stopped goes out now.
        await relayServer.relay.flush();
        let receipts = 0;
        let owed = 0;
        let txs = 0;
        let settled = 0n;
        for (const [i, report] of reports.entries()) {
          for (const lane of report?.lanes ?? []) {
            receipts += lane.receipts;
            owed += lane.owedMicros;
            settled += (await app.laneOf(lane.payer, payouts[i]!)).settled;
          }
          txs += report?.settlementTxs ?? 0;
        }
        const c = relayServer.relay.counters;
        return {
          receipts,
          owed_micros: owed,
          settled_micros: Number(settled),
          settlement_txs: txs,
          relayed_micros: c.paidMicros,
          relay_fees_micros: c.feesMicros,
          relay_txs: c.txs,
        };
      },
      async close() {
        await relayServer.close();
        await chain.close();
        await rm(dir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    await relay?.close().catch(() => {});
    await chain.close();
    if (runDir) await rm(runDir, { recursive: true, force: true });
    throw err;
  }
}
