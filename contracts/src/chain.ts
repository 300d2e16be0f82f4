/**
 * A real local EVM chain for tests, benchmarks and `npm start`: a Hardhat 2 node (EDR) as a child
 * process on loopback, on a free port. Hardhat 3 needs Node 22, so Hardhat 2 it is.
 *
 * The child watches its stdin pipe and exits when this process goes away, even after SIGKILL; close()
 * stops it with SIGTERM, then SIGKILL. Any other EVM JSON-RPC endpoint can be used instead: see
 * connectRpc() and deployMesh(), or pass existing escrow and token addresses to EscrowClient (escrow.ts).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { createServer } from 'node:net';
import path from 'node:path';
import { MeshError } from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { ESCROW_ABI } from './abi.ts';
import { artifact, CONTRACTS_DIR } from './compile.ts';
import { toChainError } from './escrow.ts';

/** Hardhat's well-known development mnemonic: these keys are public, never use them on a real chain. */
export const DEV_MNEMONIC = 'test test test test test test test test test test test junk';

export interface LocalChain {
  rpcUrl: string;
  chainId: bigint;
  /** Funded accounts (10,000 ETH each) and their private keys, in the same order. */
  accounts: string[];
  privateKeys: string[];
  provider: ethers.JsonRpcProvider;
  /** A Wallet for account i, connected to the provider. */
  wallet(i: number): ethers.Wallet;
  /** Moves the chain's clock forward and mines a block (evm_increaseTime + evm_mine). */
  increaseTime(seconds: number | bigint): Promise<void>;
  /** The child's process id. */
  pid: number;
  close(): Promise<void>;
}

export interface StartChainOptions {
  /** 0 (default) picks a free port. */
  port?: number;
  chainId?: number;
  /** How many funded accounts (default 20). */
  accounts?: number;
  startTimeoutMs?: number;
  log?: (line: string) => void;
}

/** A JSON-RPC provider tuned for a local or remote node: fixed network, fast receipt polling. */
export function connectRpc(rpcUrl: string, chainId?: bigint | number): ethers.JsonRpcProvider {
  const network = chainId === undefined ? undefined : ethers.Network.from(BigInt(chainId));
  return new ethers.JsonRpcProvider(rpcUrl, network, {
    staticNetwork: network ?? null,
    pollingInterval: 100,
    batchMaxCount: 1,
    // ethers caches identical calls for 250 ms by default: back-to-back transactions would reuse a stale nonce.
    cacheTimeout: -1,
  });
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

async function rpcChainId(rpcUrl: string): Promise<bigint | undefined> {
  try {
    const res = await fetch(rpcUrl, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'eth_chainId', params: [] }),
      signal: AbortSignal.timeout(1_000),
    });
    const body = (await res.json()) as { result?: string };
    return body.result === undefined ? undefined : BigInt(body.result);
  } catch {
    return undefined;
  }
}

const live = new Set<ChildProcess>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.once('exit', () => {
    for (const child of live) child.kill('SIGKILL');
  });
}

export async function startLocalChain(options: StartChainOptions = {}): Promise<LocalChain> {
  const { chainId = 31337, accounts: count = 20, startTimeoutMs = 30_000, log } = options;
  let lastError: MeshError | undefined;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = options.port ? options.port : await freePort();
    try {
      return await startOnce(port, chainId, count, startTimeoutMs, log);
    } catch (err) {
      lastError = err instanceof MeshError ? err : new MeshError('MESH_CHAIN_UNREACHABLE', (err as Error).message, { cause: err });
      if (options.port) break; // a port the caller chose: do not silently move
      log?.(`local chain: start on port ${port} failed (${lastError.message}); retrying on another port`);
    }
  }
  // The loop ran at least once, so lastError is set; the fallback only satisfies the type.
  throw lastError ?? new MeshError('MESH_CHAIN_UNREACHABLE', 'local chain did not start');
}

async function startOnce(
  port: number,
  chainId: number,
  count: number,
  startTimeoutMs: number,
  log?: (line: string) => void,
): Promise<LocalChain> {
  const child = spawn(process.execPath, [path.join(CONTRACTS_DIR, 'hardhat-node.cjs'), String(port), '127.0.0.1'], {
    cwd: CONTRACTS_DIR,
    stdio: ['pipe', 'pipe', 'pipe'],
    // Its own process group: a terminal's Ctrl-C reaches only the parent, which may still need the chain
    // (agents settle as they stop) and closes it last. It still exits when the parent goes (stdin closes).
    detached: true,
    env: { ...process.env, MESH_CHAIN_ID: String(chainId), MESH_CHAIN_ACCOUNTS: String(count), HARDHAT_DISABLE_TELEMETRY_PROMPT: 'true' },
  });
  live.add(child);
  installExitHook();
  // The node logs every call; keep only a tail for error messages, and never let the pipes fill.
  let tail = '';
  const keep = (chunk: Buffer) => {
    tail = (tail + chunk.toString('utf8')).slice(-4_000);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  child.stdin!.on('error', () => {});
  let exited: number | null | undefined;
  const exitedP = new Promise<void>((resolve) => {
    child.once('exit', (code, signal) => {
      exited = code ?? (signal ? -1 : null);
      live.delete(child);
      resolve();
    });
  });

  const rpcUrl = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + startTimeoutMs;
  const started = Date.now();
  for (;;) {
    if (exited !== undefined) {
      throw new MeshError('MESH_CHAIN_UNREACHABLE', `hardhat node exited (${exited}) before answering: ${tail.slice(-600)}`, {
        details: { rpcUrl, exitCode: exited },
      });
    }
    const id = await rpcChainId(rpcUrl);
    if (id !== undefined) {
      if (id !== BigInt(chainId)) {
        child.kill('SIGKILL');
        throw new MeshError('MESH_CONFIG', `port ${port} answers chain id ${id}, not ${chainId}: another node?`, {
          details: { rpcUrl, chainId: id.toString() },
        });
      }
      break;
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new MeshError(
        'MESH_CHAIN_UNREACHABLE',
        `hardhat node did not answer on ${rpcUrl} within ${startTimeoutMs} ms: ${tail.slice(-600)}`,
        {
          details: { rpcUrl },
        },
      );
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  log?.(`local chain ${chainId} on ${rpcUrl} (pid ${child.pid}) ready in ${Date.now() - started} ms`);

  const provider = connectRpc(rpcUrl, chainId);
  const root = ethers.HDNodeWallet.fromPhrase(DEV_MNEMONIC, undefined, "m/44'/60'/0'/0");
  const wallets = Array.from({ length: count }, (_, i) => root.deriveChild(i));
  const privateKeys = wallets.map((w) => w.privateKey);
  const accounts = wallets.map((w) => w.address);

  let closing: Promise<void> | undefined;
  return {
    rpcUrl,
    chainId: BigInt(chainId),
    accounts,
    privateKeys,
    provider,
    pid: child.pid!,
    wallet: (i: number) => {
      const key = privateKeys[i];
      if (key === undefined) {
        throw new MeshError('MESH_BAD_REQUEST', `the local chain has ${count} accounts, not ${i + 1}`, { details: { field: 'account' } });
      }
      return new ethers.Wallet(key, provider);
    },
    increaseTime: async (seconds: number | bigint) => {
      await provider.send('evm_increaseTime', [Number(seconds)]);
      await provider.send('evm_mine', []);
    },
    close: () => {
      closing ??= (async () => {
        provider.destroy();
        if (exited !== undefined) return;
        child.stdin!.end();
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 3_000);
        await exitedP;
        clearTimeout(timer);
      })();
      return closing;
    },
  };
}

export interface MeshDeployment {
  chainId: bigint;
  escrow: string;
  token: string;
  thawSeconds: bigint;
  withdrawWindowSeconds: bigint;
  /** Block of the escrow's deployment: where a log scan can start. */
  deployBlock: number;
}

/** The withdrawal window `deployMesh` uses unless told: a day to run a thawed withdrawal before it lapses. */
export const DEFAULT_WITHDRAW_WINDOW_SECONDS = 86_400;

/**
 * Deploys MeshEscrow (and MockUSDC unless `token` names an existing stablecoin) with `signer` as
 * deployer. Works on any EVM chain the signer is connected to. The escrow refuses a thaw outside
 * [1 s, 365 days], a window outside [1 h, 30 days] and a token without 6 decimals: the deployment then
 * fails with MESH_CHAIN_REVERTED and the decoded reason (e.g. `BadThaw(0)`).
 */
export async function deployMesh(
  signer: ethers.Signer,
  {
    thawSeconds,
    withdrawWindowSeconds = DEFAULT_WITHDRAW_WINDOW_SECONDS,
    token,
  }: { thawSeconds: number | bigint; withdrawWindowSeconds?: number | bigint; token?: string },
): Promise<MeshDeployment> {
  const provider = signer.provider;
  if (!provider) throw new MeshError('MESH_CONFIG', 'deployMesh: the signer has no provider', { details: { field: 'signer' } });
  let tokenAddress = token;
  if (tokenAddress === undefined) {
    const usdc = artifact('MockUSDC');
    const c = await new ethers.ContractFactory(usdc.abi as ethers.InterfaceAbi, usdc.bytecode, signer).deploy();
    await c.waitForDeployment();
    tokenAddress = await c.getAddress();
  }
  const esc = artifact('MeshEscrow');
  let escrow: ethers.BaseContract;
  let receipt: ethers.TransactionReceipt | null;
  try {
    escrow = await new ethers.ContractFactory(ESCROW_ABI, esc.bytecode, signer).deploy(
      tokenAddress,
      BigInt(thawSeconds),
      BigInt(withdrawWindowSeconds),
    );
    receipt = await escrow.deploymentTransaction()!.wait();
  } catch (err) {
    throw toChainError(err, 'deployMesh');
  }
  const address = await escrow.getAddress();
  // Sanity: the compiled contract answers the ABI protocol/ speaks.
  const check = new ethers.Contract(address, ESCROW_ABI, provider);
  const onChainToken = (await check.getFunction('token')()) as string;
  if (onChainToken.toLowerCase() !== tokenAddress.toLowerCase()) {
    // An invariant of the compiled contract, not an input: it answers the token it was deployed with.
    throw new MeshError('MESH_INTERNAL', 'deployMesh: escrow reports another token', { details: { escrow: address, token: onChainToken } });
  }
  const { chainId } = await provider.getNetwork();
  return {
    chainId,
    escrow: address,
    token: ethers.getAddress(tokenAddress),
    thawSeconds: BigInt(thawSeconds),
    withdrawWindowSeconds: BigInt(withdrawWindowSeconds),
    deployBlock: receipt?.blockNumber ?? 0,
  };
}

/** Deploys a contract compiled by compile.ts by name (tests: HostileToken). */
export async function deployArtifact(signer: ethers.Signer, name: string, args: unknown[] = []): Promise<string> {
  const a = artifact(name);
  const c = await new ethers.ContractFactory(a.abi as ethers.InterfaceAbi, a.bytecode, signer).deploy(...args);
  await c.waitForDeployment();
  return c.getAddress();
}
