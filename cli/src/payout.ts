/**
 * `edge-mesh payout`: an agent's payout address in the escrow's registry (docs/settlement.md, "Payouts").
 * Payers check that the payout an agent quotes is registered to that agent's key before they pay it, so
 * an operator registers each agent once, from the payout account (it pays the transaction's gas).
 */
import { loadKeyFile } from '@edge-mesh/client';
import { agentBindingMessage, deriveId, MeshError, signBytes } from '@edge-mesh/protocol';
import type { Command } from 'commander';
import { connectFromOptions } from './chain.ts';

const keyWarnings = { warn: (message: string) => process.stderr.write(`edge-mesh: warning: ${message}\n`) };

const chainOptions = (cmd: Command) =>
  cmd
    .option('--rpc <url>', 'EVM JSON-RPC URL (env MESH_RPC_URL)')
    .option('--escrow <address>', 'MeshEscrow address (env MESH_ESCROW)')
    .option('--deployment <file>', 'JSON written by `edge-mesh chain --out`: supplies rpc and escrow');

export function registerPayoutCommands(program: Command): void {
  const payout = program
    .command('payout')
    .description("an agent's payout address in the escrow's registry, which payers check before they pay");
  chainOptions(
    payout
      .command('register')
      .description("register an agent's key for a payout address: sent by the payout account, which pays the gas")
      .requiredOption('--agent-key <file>', 'the agent key file (edge-mesh keys new --role agent); only its public half goes on chain')
      .option('--key <file>', "file with the payout account's 0x-hex EVM private key (env MESH_EVM_KEY holds the key itself)"),
  ).action(async (opts: { agentKey: string; key?: string; rpc?: string; escrow?: string; deployment?: string }) => {
    const agent = await loadKeyFile(opts.agentKey, 'agent', keyWarnings);
    const { client, signer } = await connectFromOptions(
      { ...opts, ...(opts.key !== undefined ? { key: opts.key } : {}) },
      { needsKey: true },
    );
    if (!signer) throw new MeshError('MESH_CONFIG', 'registering needs the payout account: --key FILE or MESH_EVM_KEY');
    const payoutAddress = signer.address.toLowerCase();
    const binding = signBytes(agent, agentBindingMessage(client.domain, payoutAddress));
    const out = await client.registerAgent(agent.publicKey, binding);
    process.stdout.write(`${JSON.stringify({ payout: payoutAddress, agent: agent.id, tx: out.hash, gasUsed: Number(out.gasUsed) })}\n`);
  });
  chainOptions(
    payout
      .command('show')
      .description('print the agent key registered for a payout address (and the agent id it derives)')
      .requiredOption('--payout <address>', 'the payout address'),
  ).action(async (opts: { payout: string; rpc?: string; escrow?: string; deployment?: string }) => {
    const { client } = await connectFromOptions(opts, { needsKey: false });
    const key = await client.agentKeyOf(opts.payout);
    const registered = !/^0x0+$/.test(key);
    process.stdout.write(
      `${JSON.stringify({ payout: opts.payout.toLowerCase(), registered, agentKey: key, agent: registered ? deriveId('agent', Buffer.from(key.slice(2), 'hex')) : null })}\n`,
    );
  });
}
