/**
 * The settlement commands end to end: `edge-mesh chain` starts a local chain and deploys, then `fund`,
 * `withdraw`, `balance`, `settle` and `claim` run against it as separate processes, the way an operator
 * uses them.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { type EscrowDomain, signVoucher } from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { ROOT } from './helpers.ts';

const CLI = path.join(ROOT, 'cli', 'bin', 'edge-mesh.mjs');

function edgeMesh(args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

// biome-ignore lint/suspicious/noExplicitAny: the CLI's JSON output, read field by field in the assertions
const lastJson = (stdout: string) => JSON.parse(stdout.trim().split('\n').at(-1)!) as Record<string, any>;

let dir: string;
let chainProc: ChildProcess;
let deployment: { rpcUrl: string; chainId: string; escrow: string; token: string; accounts: string[]; keyFiles: string[] };
const depFile = () => path.join(dir, 'deployment.json');

before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'edge-mesh-chain-'));
  await mkdir(path.join(dir, 'keys'));
  chainProc = spawn(
    process.execPath,
    [CLI, 'chain', '--port', '0', '--accounts', '4', '--out', depFile(), '--write-keys', path.join(dir, 'keys')],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  chainProc.stderr!.resume();
  deployment = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('edge-mesh chain printed nothing in 60 s')), 60_000);
    chainProc.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('\n')) {
        clearTimeout(timer);
        resolve(JSON.parse(out.split('\n')[0]!));
      }
    });
    chainProc.once('exit', (code) => reject(new Error(`edge-mesh chain exited with ${code}`)));
  });
});

after(async () => {
  if (chainProc && chainProc.exitCode === null) {
    chainProc.kill('SIGTERM');
    await once(chainProc, 'exit');
  }
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('edge-mesh chain, fund, balance, settle', () => {
  test('every settlement command has --help', async () => {
    await Promise.all(
      ['chain', 'fund', 'withdraw', 'settle', 'claim', 'balance'].map(async (cmd) => {
        const { code, stdout } = await edgeMesh([cmd, '--help']);
        assert.equal(code, 0);
        assert.match(stdout, new RegExp(`Usage: edge-mesh ${cmd}`));
      }),
    );
  });

  test('chain writes the deployment and private key files with mode 0600', async () => {
    assert.equal(deployment.chainId, '31337');
    assert.ok(ethers.isAddress(deployment.escrow) && ethers.isAddress(deployment.token));
    assert.deepEqual(JSON.parse(await readFile(depFile(), 'utf8')).escrow, deployment.escrow);
    assert.equal((await stat(deployment.keyFiles[1]!)).mode & 0o777, 0o600);
  });

  test('fund (approve and permit), balance, settle from a vouchers file', async () => {
    const agent = ethers.Wallet.createRandom().address;
    const key1 = deployment.keyFiles[1]!;
    const key2 = deployment.keyFiles[2]!;
    const f1 = await edgeMesh(['fund', '--deployment', depFile(), '--key', key1, '--agent', agent, '--amount', '2000000', '--mint']);
    assert.equal(f1.code, 0, f1.stderr);
    assert.equal(lastJson(f1.stdout).lane.remaining, '2000000');
    // The key can also come from the environment, and the chain from options.
    const pk2 = (await readFile(key2, 'utf8')).trim();
    const f2 = await edgeMesh(
      ['fund', '--rpc', deployment.rpcUrl, '--escrow', deployment.escrow, '--agent', agent, '--amount', '1000000', '--mint', '--permit'],
      { MESH_EVM_KEY: pk2 },
    );
    assert.equal(f2.code, 0, f2.stderr);

    const domain: EscrowDomain = { chainId: 31337n, escrow: deployment.escrow };
    const entries = [];
    for (const [keyFile, cumulative, fee] of [
      [key1, 700_000n, 0n],
      [key2, 300_000n, 5n],
    ] as const) {
      const wallet = new ethers.Wallet((await readFile(keyFile, 'utf8')).trim());
      const voucher = { agent, cumulative, feeCumulative: fee, receiptsRoot: ethers.id(`r${cumulative}`) };
      entries.push({
        voucher: { ...voucher, cumulative: cumulative.toString(), feeCumulative: fee.toString() },
        signature: await signVoucher(wallet, domain, voucher),
      });
    }
    const file = path.join(dir, 'vouchers.json');
    await writeFile(file, JSON.stringify(entries));
    const s = await edgeMesh(['settle', '--deployment', depFile(), '--key', deployment.keyFiles[3]!, '--vouchers', file]);
    assert.equal(s.code, 0, s.stderr);
    const settled = lastJson(s.stdout);
    assert.equal(settled.paid, '1000000');
    assert.equal(settled.fees, '5', "the relayer's fee, paid to --key");
    assert.equal(settled.txs.length, 1);

    const b = await edgeMesh(['balance', '--deployment', depFile(), '--address', agent]);
    assert.equal(b.code, 0, b.stderr);
    assert.equal(lastJson(b.stdout).balance, '1000000');
    const lane = await edgeMesh(['balance', '--deployment', depFile(), '--key', key1, '--agent', agent]);
    assert.deepEqual(
      {
        remaining: lastJson(lane.stdout).lane.remaining,
        settled: lastJson(lane.stdout).lane.settled,
        owner: lastJson(lane.stdout).lane.owner,
      },
      { remaining: '1300000', settled: '700000', owner: deployment.accounts[1] },
    );

    // Settling the same file again pays nothing and reports why.
    const again = await edgeMesh(['settle', '--deployment', depFile(), '--key', deployment.keyFiles[3]!, '--vouchers', file]);
    assert.equal(lastJson(again.stdout).paid, '0');
    assert.deepEqual(
      lastJson(again.stdout).txs[0].skipped.map((k: { reason: string }) => k.reason),
      ['STALE', 'STALE'],
    );
  });

  test("an owner funds an app key's lane with its consent and takes a fixed amount back after the thaw; the app key cannot", async () => {
    const agent = ethers.Wallet.createRandom().address;
    const [ownerKey, appKey] = [deployment.keyFiles[2]!, deployment.keyFiles[3]!];
    const [owner, app] = [deployment.accounts[2]!, deployment.accounts[3]!];
    const d = depFile();
    const f = await edgeMesh([
      'fund',
      '--deployment',
      d,
      '--key',
      ownerKey,
      '--signer-key',
      appKey,
      '--agent',
      agent,
      '--amount',
      '1000000',
      '--mint',
    ]);
    assert.equal(f.code, 0, f.stderr);
    assert.deepEqual(
      [lastJson(f.stdout).signer, lastJson(f.stdout).lane.owner, lastJson(f.stdout).lane.remaining],
      [app, owner, '1000000'],
    );

    // The app key may not take the money, and a stranger's funding without consent is refused.
    const byApp = await edgeMesh(['withdraw', '--deployment', d, '--key', appKey, '--agent', agent, '--amount', '1']);
    assert.equal(byApp.code, 1);
    assert.match(byApp.stderr, /MESH_CHAIN_REVERTED: requestWithdraw: NotLaneOwner\(/);
    const stranger = await edgeMesh([
      'fund',
      '--deployment',
      d,
      '--key',
      deployment.keyFiles[1]!,
      '--signer',
      app,
      '--agent',
      agent,
      '--amount',
      '1',
      '--mint',
    ]);
    assert.match(stranger.stderr, /NotLaneOwner\(/);
    // A top-up is a gift: it is allowed and gives no rights.
    const gift = await edgeMesh([
      'fund',
      '--deployment',
      d,
      '--key',
      deployment.keyFiles[1]!,
      '--signer',
      app,
      '--agent',
      agent,
      '--amount',
      '5',
      '--mint',
      '--top-up',
    ]);
    assert.equal(gift.code, 0, gift.stderr);
    assert.equal(lastJson(gift.stdout).lane.owner, owner);

    const req = await edgeMesh(['withdraw', '--deployment', d, '--key', ownerKey, '--signer', app, '--agent', agent, '--amount', '400000']);
    assert.equal(req.code, 0, req.stderr);
    assert.equal(lastJson(req.stdout).lane.withdrawAmount, '400000');
    const early = await edgeMesh(['withdraw', '--deployment', d, '--key', ownerKey, '--signer', app, '--agent', agent, '--execute']);
    assert.match(early.stderr, /StillThawing\(/);
    // The chain's clock moves past the thaw (an hour on `edge-mesh chain` by default).
    for (const [method, params] of [
      ['evm_increaseTime', [3_600]],
      ['evm_mine', []],
    ] as const) {
      await fetch(deployment.rpcUrl, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ jsonrpc: '2.0', id: 1, method, params }),
      });
    }
    const out = await edgeMesh(['withdraw', '--deployment', d, '--key', ownerKey, '--signer', app, '--agent', agent, '--execute']);
    assert.equal(out.code, 0, out.stderr);
    assert.equal(lastJson(out.stdout).withdrawn, '400000');
    assert.equal(lastJson(out.stdout).lane.remaining, '600005');

    const help = await edgeMesh(['withdraw', '--deployment', d, '--key', ownerKey, '--agent', agent]);
    assert.match(help.stderr, /MESH_CONFIG: withdraw: give exactly one of/);
    const claim = await edgeMesh(['claim', '--deployment', d, '--key', ownerKey, '--payee', agent]);
    assert.match(claim.stderr, /NothingToClaim\(/);
  });

  test('clear coded errors', async () => {
    const d = depFile();
    const [noChain, noKey, poor, notEscrow, down, badAmount] = await Promise.all([
      edgeMesh(['balance', '--address', deployment.accounts[0]!], { MESH_RPC_URL: '', MESH_ESCROW: '' }),
      edgeMesh(['fund', '--deployment', d, '--agent', deployment.accounts[0]!, '--amount', '5'], { MESH_EVM_KEY: '' }),
      // Account 0 deployed the escrow and never held the stablecoin.
      edgeMesh(['fund', '--deployment', d, '--key', deployment.keyFiles[0]!, '--agent', deployment.accounts[1]!, '--amount', '5']),
      edgeMesh(['balance', '--rpc', deployment.rpcUrl, '--escrow', deployment.accounts[0]!, '--address', deployment.accounts[0]!]),
      edgeMesh(['balance', '--rpc', 'http://127.0.0.1:9', '--escrow', deployment.escrow, '--address', deployment.accounts[0]!]),
      edgeMesh(['fund', '--deployment', d, '--key', deployment.keyFiles[1]!, '--agent', deployment.accounts[0]!, '--amount', '1.5']),
    ]);
    assert.equal(noChain.code, 78, 'a configuration error exits 78');
    assert.match(noChain.stderr, /MESH_CONFIG: no chain/);
    assert.match(noKey.stderr, /MESH_CONFIG: this command sends a transaction/);
    assert.equal(poor.code, 1);
    assert.match(poor.stderr, /MESH_CHAIN_REVERTED: fund: .* holds 0 token units/);
    assert.match(notEscrow.stderr, /MESH_CONFIG: no contract at .*: not a MeshEscrow/);
    assert.equal(down.code, 1);
    assert.match(down.stderr, /MESH_CHAIN_UNREACHABLE/);
    assert.notEqual(badAmount.code, 0);
    assert.match(badAmount.stderr, /whole number of token units/);
  });
});
