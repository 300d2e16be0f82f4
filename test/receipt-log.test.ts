/**
 * The agent's receipt log (edge-agent/src/receipt-log.ts): what is appended is read back in order after a
 * stop, a record a crash cut short (or a damaged one) ends its segment and is dropped without losing the
 * records before it or those appended after a restart, and fdatasync is shared by a burst.
 * Opening the agent's payments on a log a crash left: the lanes' heads move to their newest receipts (a lane whose
 * record never reached the disk too). A real agent killed with receipts still in the log: test/payments-mesh.test.ts
 * ("survive kill -9").
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { appendFileSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import {
  encodeCbor,
  fromHex,
  generateIdentity,
  MeshError,
  newRequestId,
  RECEIPT_STATUS,
  RECEIPT_VERSION,
  type SignedReceipt,
  signLaneGrant,
  signReceipt,
  ZERO_HASH,
} from '@edge-mesh/protocol';
import { AgentPayments } from '../edge-agent/src/payments.ts';
import { decodeRecords, encodeRecord, ReceiptLog } from '../edge-agent/src/receipt-log.ts';
import { quiet, ROOT, tempDir } from './helpers.ts';
import { fundOwnLane } from './payer.ts';

const identity = generateIdentity('agent');
const PAYERS = [`0x${'a1'.repeat(20)}`, `0x${'b2'.repeat(20)}`];

function receipt(seq: number): SignedReceipt {
  return signReceipt(identity, {
    v: RECEIPT_VERSION,
    chainId: 31337,
    escrow: `0x${'11'.repeat(20)}`,
    payer: PAYERS[seq % 2]!,
    agentKey: identity.publicKey,
    seq,
    requestId: Uint8Array.from({ length: 16 }, (_, i) => (seq + i) & 0xff),
    modelHash: new Uint8Array(32).fill(3),
    inputHash: new Uint8Array(32).fill(4),
    outputHash: new Uint8Array(32).fill(5),
    status: RECEIPT_STATUS.ok,
    unitsUsed: 1,
    price: 10,
    cumulative: 10 * seq,
    startedAt: 1_000 + seq,
    finishedAt: 1_001 + seq,
    prevReceipt: ZERO_HASH,
  }).receipt;
}

const segments = (dir: string) => readdirSync(dir).filter((f) => f.endsWith('.log'));
const seqs = (records: { receipt: SignedReceipt }[]) => records.map((r) => r.receipt.seq);

test('receipts appended are read back in order, with their payers, after the log is closed or left open', async (t) => {
  const dir = await tempDir(t);
  const first = ReceiptLog.open(dir);
  assert.equal(first.replay.records.length, 0);
  for (let seq = 1; seq <= 5; seq++) first.log.append(PAYERS[seq % 2]!, receipt(seq));
  // Left open, as a killed process leaves it: each append is already in the file.
  const second = ReceiptLog.open(dir);
  t.after(() => second.log.close());
  assert.deepEqual(seqs(second.replay.records), [1, 2, 3, 4, 5]);
  assert.deepEqual(
    second.replay.records.map((r) => r.payer),
    [1, 2, 3, 4, 5].map((s) => PAYERS[s % 2]),
  );
  assert.deepEqual(second.replay.records[2]!.receipt, receipt(3), 'the receipt is read back byte for byte');
  assert.equal(second.replay.droppedBytes, 0);
  assert.notEqual(second.log.current, first.log.current, 'appends after a restart go to a new segment');
  await first.log.close();
});

test('a record cut short by a crash is dropped; the records before it and those appended after the restart are kept', async (t) => {
  const dir = await tempDir(t);
  const { log } = ReceiptLog.open(dir);
  for (let seq = 1; seq <= 3; seq++) log.append(PAYERS[0]!, receipt(seq));
  const torn = encodeRecord(PAYERS[0]!, receipt(4)).subarray(0, 30);
  appendFileSync(log.current, torn);
  const crashed = log.current;
  await log.close();

  const again = ReceiptLog.open(dir);
  assert.deepEqual(seqs(again.replay.records), [1, 2, 3]);
  assert.equal(again.replay.droppedBytes, torn.length);
  assert.equal(
    statSync(crashed).size,
    [1, 2, 3].reduce((n, seq) => n + encodeRecord(PAYERS[0]!, receipt(seq)).length, 0),
    'the torn tail is cut off the file',
  );
  again.log.append(PAYERS[0]!, receipt(4));
  await again.log.close();

  const third = ReceiptLog.open(dir);
  t.after(() => third.log.close());
  assert.deepEqual(seqs(third.replay.records), [1, 2, 3, 4]);
  assert.equal(third.replay.droppedBytes, 0);
});

test('a damaged record ends its segment: a flipped payload byte, a length word past the end, garbage', async (t) => {
  const records = [1, 2, 3].map((seq) => encodeRecord(PAYERS[0]!, receipt(seq)));
  const whole = Buffer.concat(records);
  assert.deepEqual(seqs(decodeRecords(whole).records), [1, 2, 3]);

  const flipped = Buffer.from(whole);
  flipped[records[0]!.length + 20]! ^= 0x40;
  const f = decodeRecords(flipped);
  assert.deepEqual(seqs(f.records), [1], 'the checksum catches the changed byte');
  assert.equal(f.goodBytes, records[0]!.length);

  const long = Buffer.from(whole);
  long.writeUInt32BE(0xffff_ff00, records[0]!.length);
  assert.deepEqual(seqs(decodeRecords(long).records), [1]);
  assert.deepEqual(seqs(decodeRecords(Buffer.from('not a receipt log at all')).records), []);

  // In a file: the damaged segment stops at the flip, a later segment is still read.
  const dir = await tempDir(t);
  writeFileSync(path.join(dir, 'receipts-0000000001.log'), flipped);
  writeFileSync(path.join(dir, 'receipts-0000000002.log'), encodeRecord(PAYERS[1]!, receipt(9)));
  const opened = ReceiptLog.open(dir);
  t.after(() => opened.log.close());
  assert.deepEqual(seqs(opened.replay.records), [1, 9]);
  assert.equal(opened.replay.droppedBytes, whole.length - records[0]!.length);
  assert.equal(path.basename(opened.log.current), 'receipts-0000000003.log');
});

test('rotate starts a new segment; remove deletes an old one and refuses the current; close can remove the last', async (t) => {
  const dir = await tempDir(t);
  const { log } = ReceiptLog.open(dir);
  log.append(PAYERS[0]!, receipt(1));
  const old = log.rotate();
  log.append(PAYERS[0]!, receipt(2));
  assert.deepEqual(segments(dir).length, 2);
  assert.throws(() => log.remove(log.current), { code: 'MESH_INTERNAL' });
  log.remove(old);
  log.remove(old);
  assert.deepEqual(segments(dir), [path.basename(log.current)]);
  assert.deepEqual(seqs(decodeRecords(readFileSync(log.current)).records), [2]);
  await log.close(true);
  assert.deepEqual(segments(dir), []);
  assert.throws(() => log.append(PAYERS[0]!, receipt(3)), { code: 'MESH_SHUTTING_DOWN' });
});

test('appendAll writes a batch together: a disk that refuses part of it keeps none of it, and the log goes on', async (t) => {
  // A file size limit (ulimit -f, in KiB) stands for a full disk: the write that crosses it is cut short, then refused.
  const dir = await tempDir(t);
  const batch = [1, 2, 3, 4].map((seq) => ({ payer: PAYERS[0]!, receipt: receipt(seq) }));
  const one = encodeRecord(PAYERS[0]!, batch[0]!.receipt).length;
  const limitKiB = 2;
  assert.ok(one < limitKiB * 1024 && 3 * one < limitKiB * 1024 && 4 * one > limitKiB * 1024, `records of ${one} bytes fit the test`);
  const script = `
    import { ReceiptLog } from ${JSON.stringify(path.join(ROOT, 'edge-agent/src/receipt-log.ts'))};
    import { decodeCbor } from '@edge-mesh/protocol';
    const batch = decodeCbor(Buffer.from(process.env.BATCH, 'hex'));
    const { log } = ReceiptLog.open(process.env.DIR);
    log.appendAll(batch.slice(0, 1));
    let code = null;
    let partKept = null;
    try { log.appendAll(batch.slice(1)); } catch (err) { code = err.code; partKept = err.details.partKept; }
    log.appendAll([]);
    await log.close();
    console.log(JSON.stringify({ code, partKept }));
  `;
  const out = await new Promise<string>((resolve, reject) => {
    const child = spawn(
      'bash',
      [
        '-c',
        `ulimit -f ${limitKiB} && exec "$0" --conditions=@edge-mesh/source --import tsx --input-type=module -e "$SCRIPT"`,
        process.execPath,
      ],
      {
        cwd: ROOT,
        env: { ...process.env, SCRIPT: script, DIR: dir, BATCH: Buffer.from(encodeCbor(batch.map((r) => ({ ...r })))).toString('hex') },
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('exit', (code) => (code === 0 ? resolve(stdout) : reject(new Error(`child exited ${code}: ${stderr}`))));
  });
  assert.deepEqual(JSON.parse(out.trim().split('\n').at(-1)!), { code: 'MESH_INTERNAL', partKept: false });
  const reopened = ReceiptLog.open(dir);
  t.after(() => reopened.log.close());
  assert.deepEqual(seqs(reopened.replay.records), [1], 'the refused batch left none of its records, not even those that fitted');
  assert.equal(reopened.replay.droppedBytes, 0, 'what the refused write put down was cut off again');
  reopened.log.appendAll(batch.slice(1));
  assert.deepEqual(seqs(decodeRecords(readFileSync(reopened.log.current)).records), [2, 3, 4], 'a batch that fits goes down whole');
});

test('with syncWrites, durable waits for fdatasync, shared by the appends of a burst, across a rotation', async (t) => {
  const dir = await tempDir(t);
  const { log } = ReceiptLog.open(dir, { syncWrites: true });
  t.after(() => log.close());
  const waits: Promise<void>[] = [];
  for (let seq = 1; seq <= 20; seq++) {
    log.append(PAYERS[0]!, receipt(seq));
    waits.push(log.durable());
    if (seq === 10) log.rotate();
  }
  // One runs, the other 19 share the one queued behind it.
  assert.equal(new Set(waits.slice(1)).size, 1, 'calls made while an fdatasync runs share the next one');
  await Promise.all(waits);
  const reopened = ReceiptLog.open(dir);
  t.after(() => reopened.log.close());
  assert.deepEqual(
    seqs(reopened.replay.records),
    Array.from({ length: 20 }, (_, i) => i + 1),
  );
  const plain = ReceiptLog.open(await tempDir(t)).log;
  t.after(() => plain.close());
  assert.equal(plain.durable(), plain.durable(), 'without syncWrites it resolves at once');
});

describe('the agent opening on a log a crash left', () => {
  let chain: LocalChain;
  let deployment: MeshDeployment;
  before(async () => {
    chain = await startLocalChain({ accounts: 4 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  /** A lane's chain of receipts as the agent signs them: seq 1.., each naming the one before. */
  function lane(payer: string, n: number): SignedReceipt[] {
    const out: SignedReceipt[] = [];
    let prev = ZERO_HASH;
    for (let seq = 1; seq <= n; seq++) {
      const signed = signReceipt(identity, {
        ...receipt(seq),
        chainId: Number(deployment.chainId),
        escrow: deployment.escrow.toLowerCase(),
        payer,
        cumulative: 10 * seq,
        prevReceipt: prev,
      });
      out.push(signed.receipt);
      prev = signed.leaf;
    }
    return out;
  }

  test("receipts only in the log are stored, and a lane with no record (its grant's write was cut off) gets its head back", async (t) => {
    const dataDir = await tempDir(t);
    const domain = { chainId: deployment.chainId, escrow: deployment.escrow };
    const payout = chain.accounts[1]!.toLowerCase();
    const open = () => AgentPayments.open(identity, { payout, domain, dataDir, provider: chain.provider }, [], quiet);
    // A first run leaves the journal's files; then a crashed run's log holds 3 receipts of a lane it never recorded.
    await (await open()).close();
    const logDir = path.join(dataDir, `payments-${deployment.chainId}-${deployment.escrow.toLowerCase()}-log`);
    const receipts = lane(PAYERS[0]!, 3);
    writeFileSync(path.join(logDir, 'receipts-0000000007.log'), Buffer.concat(receipts.map((r) => encodeRecord(PAYERS[0]!, r))));

    const payments = await open();
    let closed = false;
    t.after(() => (closed ? undefined : payments.close()));
    const summary = payments.lanesSummary().find((l) => l.payer === PAYERS[0]);
    assert.ok(summary, 'the lane is back, without its grant');
    assert.equal(summary.receipts, 3, 'its head is the newest receipt: the next one is seq 4, not seq 1 again');
    assert.equal(summary.owedMicros, 30);
    assert.equal(summary.senderId, '');
    assert.deepEqual(
      (await payments.receipts(PAYERS[0]!)).map((r) => r.seq),
      [1, 2, 3],
    );
    assert.deepEqual(segments(logDir).length, 1, 'the old segment is gone once its receipts are stored; a fresh one is open');
    await payments.close();
    closed = true;

    // Stored for good: a third open finds the same head without any log.
    assert.deepEqual(segments(logDir), []);
    const third = await open();
    t.after(() => third.close());
    assert.equal(third.lanesSummary().find((l) => l.payer === PAYERS[0])?.receipts, 3);
  });
  test('a journal that refuses writes: receipts wait in a few log segments, paid work stops at the cap with MESH_BUSY, and all are stored once it writes again', async (t) => {
    const dataDir = await tempDir(t);
    const domain = { chainId: deployment.chainId, escrow: deployment.escrow };
    const payout = chain.accounts[2]!.toLowerCase();
    const payerWallet = chain.wallet(3);
    const payer = payerWallet.address.toLowerCase();
    await fundOwnLane(payerWallet, deployment.escrow, payout, 1_000_000_000n);
    const open = () =>
      AgentPayments.open(
        identity,
        { payout, domain, dataDir, provider: chain.provider, creditMicros: 100_000_000 },
        [{ name: 'kws', sha256: 'ab'.repeat(32), priceMicros: 1 }],
        quiet,
      );
    const payments = await open();
    let closed = false;
    t.after(() => (closed ? undefined : payments.close()));
    const client = 'app-journal';
    const terms = { agent: payout, client, issuedAt: Date.now() };
    const grant = { ...terms, payer, sig: fromHex(await signLaneGrant(payerWallet, domain, terms)) };
    const serveOne = async (withGrant = false) => {
      const job = await payments.admit(payer, client, 'kws', new Uint8Array(32), withGrant ? grant : undefined);
      const now = Date.now();
      const { durable } = payments.issue(job, {
        requestId: newRequestId(),
        status: RECEIPT_STATUS.ok,
        unitsUsed: 1,
        outputHash: new Uint8Array(32),
        startedAt: now,
        finishedAt: now,
      });
      await durable;
    };
    await serveOne(true);
    const logDir = path.join(dataDir, `payments-${deployment.chainId}-${deployment.escrow.toLowerCase()}-log`);

    // The journal stops writing (its database closed under the agent): every move into it fails from now on.
    const db = (payments as unknown as { db: { close(): Promise<void>; open(): Promise<void> } }).db;
    await db.close();
    for (let i = 0; i < 700; i++) await serveOne();
    await new Promise((r) => setTimeout(r, 1_300));
    // A failed move is tried again on the timer, not once per receipt: a handful of segments, not one per receipt.
    const waiting = segments(logDir).length;
    assert.ok(waiting >= 2 && waiting <= 4, `${waiting} segments`);

    // Paid work stops at the cap of receipts not yet moved, with a coded refusal; nothing is lost.
    let served = 701;
    let refusal: unknown;
    for (;;) {
      try {
        await serveOne();
        served++;
      } catch (err) {
        refusal = err;
        break;
      }
      assert.ok(served <= 70_000, 'no cap');
    }
    assert.ok(refusal instanceof MeshError && refusal.code === 'MESH_BUSY', String(refusal));
    assert.equal(served, 65_536);
    assert.ok(segments(logDir).length <= 8, `${segments(logDir).length} segments`);

    // The journal writes again: the next try moves everything, deletes the segments, and paid work goes on.
    await db.open();
    const until = Date.now() + 30_000;
    while (segments(logDir).length > 1 || (await payments.receipts(payer)).length < served) {
      assert.ok(Date.now() < until, `still ${segments(logDir).length} segments`);
      await new Promise((r) => setTimeout(r, 100));
    }
    await serveOne();
    served++;
    await payments.close();
    closed = true;
    const again = await open();
    t.after(() => again.close());
    const lane = again.lanesSummary().find((l) => l.payer === payer);
    assert.equal(lane?.receipts, served, 'every receipt stored, in one unbroken chain');
    assert.equal(lane?.owedMicros, served);
    const stored = await again.receipts(payer);
    assert.deepEqual(
      stored.map((r) => r.seq),
      Array.from({ length: served }, (_, i) => i + 1),
    );
  });
});
