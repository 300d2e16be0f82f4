/** `edge-mesh relay` and `edge-mesh router --relay-evm-key` as processes, against a local chain (docs/cli.md). */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import path from 'node:path';
import { after, before, describe, type TestContext, test } from 'node:test';
import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { signVoucher } from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { brokerFor, ROOT } from './helpers.ts';

const BIN = path.join(ROOT, 'cli', 'bin', 'edge-mesh.mjs');
const ROOT_HASH = `0x${'cd'.repeat(32)}`;
let chain: LocalChain;
let deployment: MeshDeployment;

/** Starts an edge-mesh command and resolves with the URL it prints on stdout (`… serving URL`). */
async function serving(t: TestContext, args: string[], env: Record<string, string>): Promise<{ child: ChildProcess; url: string }> {
  const child = spawn(process.execPath, [BIN, ...args, '--log-level', 'warn'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
  t.after(async () => {
    if (child.exitCode === null) {
      child.kill('SIGTERM');
      await once(child, 'exit');
    }
  });
  let out = '';
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const url = await new Promise<string>((resolve, reject) => {
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const m = /serving (http:\/\/\S+)/.exec(out);
      if (m) resolve(m[1]!);
    });
    child.on('exit', (code) => reject(new Error(`exited ${code}: ${err}`)));
  });
  return { child, url };
}

async function relayOneVoucher(url: string, relayAddress: string, payerIndex: number): Promise<void> {
  const payout = ethers.Wallet.createRandom().address.toLowerCase();
  const payer = chain.wallet(payerIndex);
  const client = await EscrowClient.connect({ runner: payer, escrow: deployment.escrow });
  await client.mint(payer.address, 100_000n);
  await client.fund(payer.address, payout, 100_000n);
  const v = { agent: payout, cumulative: 5_000n, feeCumulative: 50n, receiptsRoot: ROOT_HASH };
  const sig = await signVoucher(payer, { chainId: deployment.chainId, escrow: deployment.escrow }, v);
  const res = await fetch(`${url}/v1/relay/vouchers`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({
      vouchers: [{ payer: payer.address, agent: payout, cumulative: '5000', feeCumulative: '50', receiptsRoot: ROOT_HASH, sig }],
    }),
  });
  const body = (await res.json()) as { accepted: number; relay: string };
  assert.equal(body.accepted, 1);
  assert.equal(body.relay, relayAddress.toLowerCase());
  const deadline = Date.now() + 15_000;
  while ((await client.tokenBalance(payout)) !== 5_000n && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  assert.equal(await client.tokenBalance(payout), 5_000n);
  assert.equal(await client.tokenBalance(relayAddress), 50n);
}

describe('the relay on the command line', () => {
  before(async () => {
    chain = await startLocalChain({ accounts: 8 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  test('edge-mesh relay settles a voucher for its fee; without a key it is MESH_CONFIG', async (t) => {
    const chainArgs = ['--rpc', chain.rpcUrl, '--escrow', deployment.escrow];
    const { url } = await serving(t, ['relay', ...chainArgs, '--port', '0', '--relay-batch-ms', '100'], {
      MESH_RELAY_EVM_KEY: chain.privateKeys[1]!,
    });
    await relayOneVoucher(url, chain.accounts[1]!, 2);

    const bare = spawn(process.execPath, [BIN, 'relay', ...chainArgs, '--port', '0'], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, MESH_RELAY_EVM_KEY: '' },
    });
    let err = '';
    bare.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const [code] = await once(bare, 'exit');
    assert.equal(code, 78, 'a configuration error exits 78');
    assert.match(err, /MESH_CONFIG/);
  });

  test('edge-mesh router --relay-evm-key serves the relay on its HTTP API', async (t) => {
    const broker = await brokerFor(t);
    const { url } = await serving(
      t,
      [
        'router',
        '--broker',
        broker.url,
        '--http-port',
        '0',
        '--rpc',
        chain.rpcUrl,
        '--escrow',
        deployment.escrow,
        '--relay-batch-ms',
        '100',
      ],
      { MESH_RELAY_EVM_KEY: chain.privateKeys[3]! },
    );
    await relayOneVoucher(url, chain.accounts[3]!, 4);
  });
});
