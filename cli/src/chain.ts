/**
 * `edge-mesh chain | fund | withdraw | settle | claim | balance`: the escrow (v2, docs/settlement.md) from
 * the command line. A lane is (signer, agent): the signer is the app's voucher key, the lane's owner the
 * key that funded it and alone may withdraw.
 *
 * Chain settings come from options, then the environment, then a deployment file written by
 * `edge-mesh chain --out FILE`:
 *   --rpc     MESH_RPC_URL    JSON-RPC URL of any EVM chain
 *   --escrow  MESH_ESCROW     MeshEscrow address
 *   --token   MESH_TOKEN      stablecoin address (optional: read from the escrow, checked if given)
 *   --key     MESH_EVM_KEY    a file holding a 0x-hex EVM private key (mode 0600); the env var holds the key itself
 * ethers and the contracts load only when one of these commands runs.
 */
import { chmod, readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { EscrowClient, SettleOutcome } from '@edge-mesh/contracts';
import type { SignedVoucher } from '@edge-mesh/protocol';
import { MeshError, signOwnerConsent } from '@edge-mesh/protocol';
import { type Command, InvalidArgumentError, Option } from 'commander';
import type { ethers } from 'ethers';

export interface ChainOptions {
  rpc?: string;
  escrow?: string;
  token?: string;
  key?: string;
  deployment?: string;
}

/** What `edge-mesh chain --out` writes and `--deployment` reads. */
export interface DeploymentFile {
  rpcUrl: string;
  chainId: string;
  escrow: string;
  token: string;
  thawSeconds: string;
  withdrawWindowSeconds: string;
  deployBlock: number;
}

const loadEthers = () => import('ethers');
const loadEscrow = () => import('@edge-mesh/contracts');

/** The largest amount a lane holds (uint96): `withdraw --amount all` asks for everything left. */
const MAX_UINT96 = (1n << 96n) - 1n;

function micros(value: string): bigint {
  if (!/^[0-9]+$/.test(value)) throw new InvalidArgumentError('must be a whole number of token units (micro-dollars: 1 USD = 1000000)');
  const n = BigInt(value);
  if (n <= 0n || n > MAX_UINT96) throw new InvalidArgumentError('must be between 1 and 2^96-1');
  return n;
}

function microsOrAll(value: string): bigint {
  return value === 'all' ? MAX_UINT96 : micros(value);
}

function seconds(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError('must be a whole number of seconds');
  return n;
}

function port(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 65_535) throw new InvalidArgumentError('must be a TCP port (0 for any free port)');
  return n;
}

const chainOptions = (cmd: Command, { needsKey }: { needsKey: boolean }) =>
  cmd
    .option('--rpc <url>', 'EVM JSON-RPC URL (env MESH_RPC_URL)')
    .option('--escrow <address>', 'MeshEscrow address (env MESH_ESCROW)')
    .option('--token <address>', 'stablecoin address; read from the escrow when omitted (env MESH_TOKEN)')
    .option('--deployment <file>', 'JSON written by `edge-mesh chain --out`: supplies rpc, escrow and token')
    .option(
      '--key <file>',
      `file with a 0x-hex EVM private key${needsKey ? '' : ' (optional here)'} (env MESH_EVM_KEY holds the key itself)`,
    );

/** Reads the EVM private key from --key FILE or MESH_EVM_KEY; never prints it. */
export async function loadEvmKey(
  file: string | undefined,
  warn: (m: string) => void = (m) => process.stderr.write(`edge-mesh: warning: ${m}\n`),
): Promise<string | undefined> {
  let text: string | undefined;
  if (file !== undefined) {
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      throw new MeshError(
        'MESH_CONFIG',
        `cannot read EVM key file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
        { cause: err },
      );
    }
    if (process.platform !== 'win32') {
      const { mode } = await stat(file);
      if (mode & 0o077) warn(`EVM key file ${file} can be read by other users (mode ${(mode & 0o777).toString(8)}); run chmod 600 ${file}`);
    }
    text = text.trim();
    if (text.startsWith('{')) {
      try {
        text = (JSON.parse(text) as { privateKey?: string }).privateKey;
      } catch {
        text = undefined;
      }
    }
  } else if (process.env.MESH_EVM_KEY) text = process.env.MESH_EVM_KEY.trim();
  if (text === undefined) return undefined;
  const key = text.startsWith('0x') ? text : `0x${text}`;
  if (!/^0x[0-9a-fA-F]{64}$/.test(key))
    throw new MeshError('MESH_CONFIG', `${file ? `EVM key file ${file}` : 'MESH_EVM_KEY'} does not hold a 32-byte hex private key`);
  return key;
}

/** Resolves the chain settings and connects an escrow client (with a signer when a key is given). */
export async function connectFromOptions(
  opts: ChainOptions,
  { needsKey }: { needsKey: boolean },
): Promise<{ client: EscrowClient; provider: ethers.JsonRpcProvider; signer?: ethers.Wallet }> {
  let fromFile: Partial<DeploymentFile> = {};
  if (opts.deployment !== undefined) {
    try {
      fromFile = JSON.parse(await readFile(opts.deployment, 'utf8')) as DeploymentFile;
    } catch (err) {
      throw new MeshError('MESH_CONFIG', `cannot read deployment file ${opts.deployment}: ${(err as Error).message}`, { cause: err });
    }
  }
  const rpc = opts.rpc ?? process.env.MESH_RPC_URL ?? fromFile.rpcUrl;
  const escrow = opts.escrow ?? process.env.MESH_ESCROW ?? fromFile.escrow;
  const token = opts.token ?? process.env.MESH_TOKEN ?? fromFile.token;
  if (!rpc)
    throw new MeshError(
      'MESH_CONFIG',
      'no chain: pass --rpc URL, set MESH_RPC_URL, or pass --deployment FILE (from `edge-mesh chain --out FILE`)',
    );
  if (!escrow) throw new MeshError('MESH_CONFIG', 'no escrow: pass --escrow ADDRESS, set MESH_ESCROW, or pass --deployment FILE');
  const { ethers } = await loadEthers();
  if (!ethers.isAddress(escrow)) throw new MeshError('MESH_CONFIG', `--escrow is not an EVM address: ${escrow}`);
  if (token !== undefined && !ethers.isAddress(token)) throw new MeshError('MESH_CONFIG', `--token is not an EVM address: ${token}`);
  const key = await loadEvmKey(opts.key);
  if (needsKey && key === undefined)
    throw new MeshError(
      'MESH_CONFIG',
      'this command sends a transaction: pass --key FILE (a 0x-hex EVM private key, mode 0600) or set MESH_EVM_KEY',
    );
  const provider = new ethers.JsonRpcProvider(rpc, undefined, { batchMaxCount: 1, cacheTimeout: -1, pollingInterval: 250 });
  const signer = key === undefined ? undefined : new ethers.Wallet(key, provider);
  const { EscrowClient } = await loadEscrow();
  const client = await EscrowClient.connect({ runner: signer ?? provider, escrow, ...(token ? { token } : {}) }).catch((err: unknown) => {
    provider.destroy();
    throw err;
  });
  return { client, provider, ...(signer ? { signer } : {}) };
}

/** Runs a chain command and closes the provider; the client's MeshErrors reach main(), which prints `CODE: message`. */
async function withClient<T>(
  opts: ChainOptions,
  needsKey: boolean,
  body: (c: { client: EscrowClient; signer?: ethers.Wallet }) => Promise<T>,
): Promise<T> {
  let provider: ethers.JsonRpcProvider | undefined;
  try {
    const c = await connectFromOptions(opts, { needsKey });
    provider = c.provider;
    return await body(c);
  } finally {
    provider?.destroy();
  }
}

const big = (_: string, v: unknown) => (typeof v === 'bigint' ? v.toString() : v);
const printJson = (value: unknown) => process.stdout.write(`${JSON.stringify(value, big)}\n`);

/** Parses a vouchers file: a JSON array of { voucher: { agent, cumulative, feeCumulative?, receiptsRoot }, signature }. */
export async function readVoucherFile(file: string): Promise<SignedVoucher[]> {
  let raw: unknown;
  try {
    raw = JSON.parse(await readFile(file, 'utf8'));
  } catch (err) {
    throw new MeshError('MESH_BAD_INPUT', `cannot read vouchers file ${file}: ${(err as Error).message}`, { cause: err });
  }
  const list = Array.isArray(raw) ? raw : (raw as { vouchers?: unknown })?.vouchers;
  if (!Array.isArray(list) || list.length === 0)
    throw new MeshError('MESH_BAD_INPUT', `${file}: expected a non-empty JSON array of { voucher, signature }`);
  return list.map((e, i) => {
    const entry = e as { voucher?: Record<string, unknown>; signature?: unknown };
    const v = entry?.voucher;
    if (!v || typeof entry.signature !== 'string') {
      throw new MeshError('MESH_BAD_INPUT', `${file}: entry ${i}: needs voucher and signature`, { details: { entry: i } });
    }
    try {
      return {
        voucher: {
          agent: String(v.agent),
          cumulative: BigInt(v.cumulative as string),
          feeCumulative: BigInt((v.feeCumulative as string | undefined) ?? 0),
          receiptsRoot: String(v.receiptsRoot),
        },
        signature: entry.signature,
      };
    } catch (err) {
      // BigInt() of a malformed amount throws SyntaxError.
      throw new MeshError('MESH_BAD_INPUT', `${file}: entry ${i}: ${(err as Error).message}`, { cause: err, details: { entry: i } });
    }
  });
}

/**
 * Settles signed vouchers: one settle() for a single agent, settleMany() for several. The place to grow
 * relayer policy (thresholds, batching limits) from.
 */
export async function settleVouchers(
  client: EscrowClient,
  entries: readonly SignedVoucher[],
  { maxPerTx = 100 }: { maxPerTx?: number } = {},
): Promise<SettleOutcome[]> {
  const byAgent = new Map<string, SignedVoucher[]>();
  for (const e of entries) {
    const key = e.voucher.agent.toLowerCase();
    byAgent.set(key, [...(byAgent.get(key) ?? []), e]);
  }
  const outcomes: SettleOutcome[] = [];
  let batch: { agent: string; entries: SignedVoucher[] }[] = [];
  let count = 0;
  const flush = async () => {
    if (batch.length === 0) return;
    outcomes.push(batch.length === 1 ? await client.settle(batch[0]!.agent, batch[0]!.entries) : await client.settleMany(batch));
    batch = [];
    count = 0;
  };
  for (const [, list] of byAgent) {
    for (let i = 0; i < list.length; i += maxPerTx) {
      const part = list.slice(i, i + maxPerTx);
      if (count + part.length > maxPerTx) await flush();
      batch.push({ agent: part[0]!.voucher.agent, entries: part });
      count += part.length;
    }
  }
  await flush();
  return outcomes;
}

export function registerChainCommands(program: Command): void {
  program
    .command('chain')
    .description(
      'start a local EVM chain (Hardhat 2 on loopback), deploy the escrow and a mock 6-decimal stablecoin, print the addresses as JSON, and run until Ctrl-C',
    )
    .option('--port <port>', 'JSON-RPC port on 127.0.0.1 (0 for any free port)', port, 8545)
    .option('--thaw <seconds>', 'withdrawal thaw period of the escrow (1 s to 365 days)', seconds, 3_600)
    .option('--withdraw-window <seconds>', 'how long a thawed withdrawal may run before it lapses (1 h to 30 days)', seconds, 86_400)
    .option('--accounts <n>', 'funded development accounts', (v) => Number(v), 10)
    .option('--out <file>', 'also write the deployment JSON here (for --deployment)')
    .option(
      '--write-keys <dir>',
      "write the development accounts' EVM keys (public Hardhat keys, local use only) as evm-<i>.key files, mode 0600",
    )
    .addOption(new Option('--duration <seconds>', 'stop by itself after this many seconds').argParser(seconds))
    .action(
      async (opts: {
        port: number;
        thaw: number;
        withdrawWindow: number;
        accounts: number;
        out?: string;
        writeKeys?: string;
        duration?: number;
      }) => {
        const { startLocalChain, deployMesh } = await import('@edge-mesh/contracts/dev');
        const chain = await startLocalChain({ port: opts.port, accounts: opts.accounts, log: (m) => process.stderr.write(`${m}\n`) }).catch(
          (err: unknown) => {
            throw new MeshError('MESH_CONFIG', `local chain did not start: ${(err as Error).message}`, { cause: err });
          },
        );
        try {
          const mesh = await deployMesh(chain.wallet(0), { thawSeconds: opts.thaw, withdrawWindowSeconds: opts.withdrawWindow });
          const deployment: DeploymentFile = {
            rpcUrl: chain.rpcUrl,
            chainId: mesh.chainId.toString(),
            escrow: mesh.escrow,
            token: mesh.token,
            thawSeconds: mesh.thawSeconds.toString(),
            withdrawWindowSeconds: mesh.withdrawWindowSeconds.toString(),
            deployBlock: mesh.deployBlock,
          };
          if (opts.out) await writeFile(opts.out, `${JSON.stringify(deployment, null, 2)}\n`);
          const keyFiles: string[] = [];
          if (opts.writeKeys) {
            for (let i = 0; i < chain.privateKeys.length; i++) {
              const file = path.join(opts.writeKeys, `evm-${i}.key`);
              await writeFile(file, `${chain.privateKeys[i]}\n`, { mode: 0o600, flag: 'w' });
              await chmod(file, 0o600);
              keyFiles.push(file);
            }
          }
          printJson({ ...deployment, accounts: chain.accounts, ...(keyFiles.length ? { keyFiles } : {}) });
          await new Promise<void>((resolve) => {
            const done = () => resolve();
            process.once('SIGINT', done);
            process.once('SIGTERM', done);
            if (opts.duration !== undefined) setTimeout(done, opts.duration * 1000).unref();
          });
        } finally {
          await chain.close();
        }
      },
    );

  chainOptions(
    program
      .command('fund')
      .description(
        "move stablecoin from --key's address into the lane (signer, agent); on a lane nobody owns yet --key becomes its owner, which needs the signer's consent unless --key is the signer",
      ),
    { needsKey: true },
  )
    .requiredOption('--agent <address>', "the agent's payout address")
    .requiredOption('--amount <micros>', 'token units to add (6 decimals: 1000000 = 1 USD)', micros)
    .option('--signer <address>', "the voucher key whose lane this is (default: --key's address)")
    .option('--signer-key <file>', "the voucher key's file: signs the consent that --key may open the lane")
    .option('--consent <hex>', "the voucher key's owner consent for --key (EIP-712 LaneOwner), signed elsewhere")
    .option('--top-up', 'give to a lane someone else owns: adds money, gives --key no rights over it', false)
    .option('--permit', 'fund in one transaction with an EIP-2612 permit instead of approve + fund', false)
    .option('--mint', 'mint the amount first (the mock stablecoin of a local chain only)', false)
    .action(
      async (
        opts: ChainOptions & {
          agent: string;
          amount: bigint;
          signer?: string;
          signerKey?: string;
          consent?: string;
          topUp: boolean;
          permit: boolean;
          mint: boolean;
        },
      ) => {
        await withClient(opts, true, async ({ client }) => {
          const me = await client.address();
          let signer = opts.signer ?? me;
          let consent = opts.consent ?? '0x';
          if (opts.signerKey !== undefined) {
            const key = await loadEvmKey(opts.signerKey);
            const { ethers } = await loadEthers();
            const wallet = new ethers.Wallet(key!);
            if (opts.signer !== undefined && opts.signer.toLowerCase() !== wallet.address.toLowerCase()) {
              throw new MeshError('MESH_CONFIG', `--signer-key holds ${wallet.address}, not --signer ${opts.signer}`);
            }
            signer = wallet.address;
            consent = await signOwnerConsent(wallet, client.domain, me);
          }
          if (opts.mint) await client.mint(me, opts.amount);
          const tx = opts.topUp
            ? await client.topUp(signer, opts.agent, opts.amount)
            : opts.permit
              ? await client.fundWithPermit(signer, opts.agent, opts.amount, { consent })
              : await client.fund(signer, opts.agent, opts.amount, { consent });
          printJson({
            funder: me,
            signer,
            agent: opts.agent,
            funded: opts.amount,
            tx: tx.hash,
            gasUsed: tx.gasUsed,
            lane: await client.laneOf(signer, opts.agent),
          });
        });
      },
    );

  chainOptions(
    program
      .command('withdraw')
      .description(
        "as the lane's owner (--key): request a withdrawal of --amount (it thaws, then may run until it lapses), --execute it, or --cancel it",
      ),
    { needsKey: true },
  )
    .requiredOption('--agent <address>', "the agent's payout address")
    .option('--signer <address>', "the voucher key whose lane this is (default: --key's address)")
    .option('--amount <micros>', 'request a withdrawal of this many token units, or `all` for whatever is left when it runs', microsOrAll)
    .option('--execute', 'run the thawed withdrawal: pays min(requested, remaining) to --key', false)
    .option('--cancel', 'cancel the pending request', false)
    .action(async (opts: ChainOptions & { agent: string; signer?: string; amount?: bigint; execute: boolean; cancel: boolean }) => {
      const chosen = [opts.amount !== undefined, opts.execute, opts.cancel].filter(Boolean).length;
      if (chosen !== 1) throw new MeshError('MESH_CONFIG', 'withdraw: give exactly one of --amount MICROS|all, --execute, --cancel');
      await withClient(opts, true, async ({ client }) => {
        const signer = opts.signer ?? (await client.address());
        let out: Record<string, unknown>;
        if (opts.amount !== undefined) {
          const r = await client.requestWithdraw(signer, opts.agent, opts.amount);
          out = { requested: opts.amount, thawEnd: r.thawEnd, lapseAt: r.lapseAt, tx: r.hash };
        } else if (opts.execute) {
          const r = await client.withdraw(signer, opts.agent);
          out = { withdrawn: r.amount, tx: r.hash };
        } else {
          out = { cancelled: true, tx: (await client.cancelWithdraw(signer, opts.agent)).hash };
        }
        printJson({ signer, agent: opts.agent, ...out, lane: await client.laneOf(signer, opts.agent) });
      });
    });

  chainOptions(
    program
      .command('claim')
      .description('pay an address the payouts whose transfer failed (a blacklisted or paused payee); anyone may send it'),
    { needsKey: true },
  )
    .requiredOption('--payee <address>', 'whose claimable payouts to pay (they go to the payee)')
    .action(async (opts: ChainOptions & { payee: string }) => {
      await withClient(opts, true, async ({ client }) => {
        const r = await client.claim(opts.payee);
        printJson({ payee: opts.payee, claimed: r.amount, tx: r.hash });
      });
    });

  chainOptions(program.command('settle').description('settle signed vouchers from a JSON file (anyone may relay; --key pays the gas)'), {
    needsKey: true,
  })
    .requiredOption(
      '--vouchers <file>',
      'JSON array of { voucher: { agent, cumulative, feeCumulative?, receiptsRoot }, signature } (numbers as strings)',
    )
    .option('--max-per-tx <n>', 'vouchers per transaction', (v) => Number(v), 100)
    .action(async (opts: ChainOptions & { vouchers: string; maxPerTx: number }) => {
      const entries = await readVoucherFile(opts.vouchers);
      await withClient(opts, true, async ({ client }) => {
        const outcomes = await settleVouchers(client, entries, { maxPerTx: opts.maxPerTx });
        printJson({
          vouchers: entries.length,
          paid: outcomes.reduce((a, o) => a + o.paid, 0n),
          fees: outcomes.reduce((a, o) => a + o.fees, 0n),
          txs: outcomes.map((o) => ({
            tx: o.hash,
            gasUsed: o.gasUsed,
            paid: o.paid,
            fees: o.fees,
            settled: o.settled.length,
            partial: o.settled.filter((x) => x.partial).length,
            skipped: o.skipped,
            deferred: o.deferred,
          })),
        });
      });
    });

  chainOptions(
    program
      .command('balance')
      .description(
        'stablecoin balance of an address and what the escrow holds for it to claim, and a lane (signer → agent) when --agent is given',
      ),
    { needsKey: false },
  )
    .option('--address <address>', "whose balance (default: --key's address)")
    .option('--agent <address>', 'also show the lane of --signer (default: the address) to this agent')
    .option('--signer <address>', 'the voucher key of the lane shown with --agent')
    .action(async (opts: ChainOptions & { address?: string; agent?: string; signer?: string }) => {
      await withClient(opts, false, async ({ client, signer }) => {
        const who = opts.address ?? signer?.address;
        if (!who) throw new MeshError('MESH_CONFIG', 'whose balance? pass --address ADDRESS or --key FILE');
        const out: Record<string, unknown> = {
          chainId: client.domain.chainId,
          escrow: client.escrow,
          token: client.token,
          address: who,
          balance: await client.tokenBalance(who),
          claimable: await client.claimable(who),
        };
        if (opts.agent) {
          const signer = opts.signer ?? who;
          out.lane = { signer, agent: opts.agent, ...(await client.laneOf(signer, opts.agent)) };
        }
        printJson(out);
      });
    });
}
