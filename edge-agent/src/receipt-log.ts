/**
 * The receipt log: the agent's write-ahead log in front of its `level` journal (payments.ts).
 *
 * A receipt leaves the agent only once it is on disk. Written through `level`, that cost a batch on the
 * main thread and a round trip to libuv's thread pool per request (~0.25 ms at the median on a 2-core
 * machine, ~1 ms at p90 under load: docs/agent.md, "With receipts on"). Here each receipt is one record, and
 * the receipts issued together are appended with a single write(2) on the main thread: once it returns they are in the page
 * cache, which is what `level` without `sync` gave (it survives kill -9, not a power cut; `syncWrites`
 * adds an fdatasync per burst for that). Receipts move into `level` in batches off the request path
 * (`rotate`, then a batch, then the old segment is removed), and on open every segment left by a crash is
 * read back.
 *
 * Files: `receipts-<n>.log` in the journal's folder, numbered in order. Record: payload length (u32 BE),
 * the first 4 bytes of sha256(payload), then the payload: CBOR `[payer, receipt]`. A record that does not
 * check (a write cut short by a crash or a full disk) ends its segment: what follows it is not read.
 */
import { createHash } from 'node:crypto';
import {
  closeSync,
  fdatasync,
  ftruncateSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  truncateSync,
  unlinkSync,
  writeSync,
} from 'node:fs';
import path from 'node:path';
import { decodeCbor, encodeCbor, MeshError, type SignedReceipt } from '@edge-mesh/protocol';

export interface LoggedReceipt {
  payer: string;
  receipt: SignedReceipt;
}

/** What opening found: the records of every segment in order, and what could not be read. */
export interface LogReplay {
  records: LoggedReceipt[];
  /** Segments read (their paths), oldest first: `remove` them once their records are in `level`. */
  segments: string[];
  /** Bytes dropped at the end of segments because a record there did not check. */
  droppedBytes: number;
}

const HEADER = 8;
/** A record larger than this is not a receipt: the length word itself is damaged. */
const MAX_RECORD = 64 * 1024;
const SEGMENT = /^receipts-(\d{10})\.log$/;

const check = (payload: Uint8Array) => createHash('sha256').update(payload).digest().subarray(0, 4);

/** Encodes one record: header and payload in one buffer, so that one write(2) puts all of it down. */
export function encodeRecord(payer: string, receipt: SignedReceipt): Buffer {
  const payload = encodeCbor([payer, receipt]);
  const out = Buffer.allocUnsafe(HEADER + payload.length);
  out.writeUInt32BE(payload.length, 0);
  check(payload).copy(out, 4);
  payload.copy(out, HEADER);
  return out;
}

/** The records of one segment's bytes, up to the first that does not check, and where that one starts. */
export function decodeRecords(bytes: Buffer): { records: LoggedReceipt[]; goodBytes: number } {
  const records: LoggedReceipt[] = [];
  let at = 0;
  while (at + HEADER <= bytes.length) {
    const length = bytes.readUInt32BE(at);
    if (length === 0 || length > MAX_RECORD || at + HEADER + length > bytes.length) break;
    const payload = bytes.subarray(at + HEADER, at + HEADER + length);
    if (!check(payload).equals(bytes.subarray(at + 4, at + HEADER))) break;
    let decoded: unknown;
    try {
      decoded = decodeCbor(payload);
    } catch {
      break;
    }
    if (!Array.isArray(decoded) || typeof decoded[0] !== 'string' || typeof decoded[1] !== 'object' || decoded[1] === null) break;
    records.push({ payer: decoded[0], receipt: decoded[1] as SignedReceipt });
    at += HEADER + length;
  }
  return { records, goodBytes: at };
}

export class ReceiptLog {
  private fd = -1;
  private file = '';
  private size = 0;
  private next: number;
  /** Segments rotated out whose records wait for an fdatasync (only with `sync`). */
  private retired: number[] = [];
  private syncing: Promise<void> | undefined;
  private queued: Promise<void> | undefined;
  /** Every fdatasync under way (close waits for them before it closes their files). */
  private readonly running = new Set<Promise<void>>();
  private closed = false;
  /** A record was cut short and could be neither cut off nor left behind: appending after it would hide what follows. */
  private broken = false;

  private constructor(
    private readonly dir: string,
    first: number,
    /** fdatasync before a receipt counts as written (`durable`). */
    private readonly syncWrites: boolean,
  ) {
    this.next = first;
    this.openSegment();
  }

  /**
   * Reads every segment in `dir` (created if missing), cuts each at its first record that does not check,
   * and starts a new segment for appends. The caller stores the records it got and then `remove`s the
   * segments read.
   */
  static open(dir: string, options: { syncWrites?: boolean } = {}): { log: ReceiptLog; replay: LogReplay } {
    mkdirSync(dir, { recursive: true });
    const numbered = readdirSync(dir)
      .map((name) => ({ name, m: SEGMENT.exec(name) }))
      .filter((f): f is { name: string; m: RegExpExecArray } => f.m !== null)
      .map((f) => ({ file: path.join(dir, f.name), n: Number(f.m[1]) }))
      .sort((a, b) => a.n - b.n);
    const replay: LogReplay = { records: [], segments: [], droppedBytes: 0 };
    for (const { file } of numbered) {
      const bytes = readFileSync(file);
      const { records, goodBytes } = decodeRecords(bytes);
      if (goodBytes < bytes.length) {
        replay.droppedBytes += bytes.length - goodBytes;
        truncateSync(file, goodBytes);
      }
      replay.records.push(...records);
      replay.segments.push(file);
    }
    const log = new ReceiptLog(dir, (numbered.at(-1)?.n ?? 0) + 1, options.syncWrites ?? false);
    return { log, replay };
  }

  /** The segment appends go to now. */
  get current(): string {
    return this.file;
  }

  /** Appends one receipt (`appendAll` with one record). */
  append(payer: string, receipt: SignedReceipt): void {
    this.appendAll([{ payer, receipt }]);
  }

  /**
   * Appends receipts with a single write(2): all of them or, when the disk refuses, none (MESH_INTERNAL; what was
   * written in part is cut off again, so the records after it stay readable). Should that cut fail too, the error's
   * `details.partKept` is true: whole records of the batch may be read back at the next open. A batch of receipts
   * issued together costs one system call, not one each.
   */
  appendAll(records: readonly LoggedReceipt[]): void {
    if (this.closed) throw new MeshError('MESH_SHUTTING_DOWN', 'the receipt log is closed');
    if (this.broken)
      throw new MeshError(
        'MESH_INTERNAL',
        'the receipt log holds a record cut short that could not be removed: no receipt is appended after it',
      );
    if (records.length === 0) return;
    const bytes =
      records.length === 1
        ? encodeRecord(records[0]!.payer, records[0]!.receipt)
        : Buffer.concat(records.map((r) => encodeRecord(r.payer, r.receipt)));
    let written = 0;
    try {
      while (written < bytes.length) written += writeSync(this.fd, bytes, written);
      this.size += bytes.length;
    } catch (err) {
      // Whether whole records of the batch may still be on disk (the cut failed): replay would read them.
      let partKept = false;
      if (written > 0) {
        try {
          ftruncateSync(this.fd, this.size);
        } catch {
          partKept = true;
          // The part written stays: later records go to a new segment, so replay still reads them.
          try {
            this.rotate();
          } catch {
            this.broken = true;
          }
        }
      }
      throw new MeshError('MESH_INTERNAL', `receipts not written to the log: ${(err as Error).message}`, {
        cause: err,
        details: { partKept },
      });
    }
  }

  /**
   * Resolves once what was appended before the call counts as written: at once (the page cache holds it),
   * or with `syncWrites` after an fdatasync. Calls made while one runs share the next: one per burst.
   */
  durable(): Promise<void> {
    if (!this.syncWrites) return DONE;
    if (!this.syncing) return this.startSync();
    this.queued ??= this.syncing
      .catch(() => {})
      .then(() => {
        this.queued = undefined;
        return this.startSync();
      });
    return this.queued;
  }

  /** Starts a new segment for appends; returns the one that was current (its records are in memory with the caller). */
  rotate(): string {
    const old = { file: this.file, fd: this.fd };
    // The new segment first: when it cannot be opened, appends stay on the current one.
    this.openSegment();
    if (this.syncWrites) this.retired.push(old.fd);
    else closeSync(old.fd);
    return old.file;
  }

  /** Deletes a segment whose records are stored elsewhere. */
  remove(file: string): void {
    if (file === this.file) throw new MeshError('MESH_INTERNAL', 'the current receipt log segment cannot be removed');
    this.unlink(file);
  }

  private unlink(file: string): void {
    try {
      unlinkSync(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
  }

  /** Closes the log (after any fdatasync under way); with `remove`, deletes the current segment too (its records are stored elsewhere). */
  async close(remove = false): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled([this.queued, ...this.running]);
    // The queued sync, when it ran, started one more.
    await Promise.allSettled([...this.running]);
    for (const fd of this.retired) closeSync(fd);
    this.retired = [];
    closeSync(this.fd);
    if (remove) this.unlink(this.file);
  }

  private startSync(): Promise<void> {
    // Segments rotated out are synced one last time and closed here; the current one stays open.
    const retired = this.retired;
    this.retired = [];
    const run = Promise.allSettled(
      [...retired, this.fd].map((fd) => new Promise<void>((resolve, reject) => fdatasync(fd, (err) => (err ? reject(err) : resolve())))),
    ).then((results) => {
      // Closed only once every fdatasync on them has returned: a number reused meanwhile is never synced or closed.
      for (const fd of retired) closeSync(fd);
      const failed = results.find((r) => r.status === 'rejected');
      if (failed) throw failed.reason;
    });
    this.syncing = run;
    this.running.add(run);
    const clear = () => {
      this.running.delete(run);
      if (this.syncing === run) this.syncing = undefined;
    };
    run.then(clear, clear);
    return run;
  }

  private openSegment(): void {
    const file = path.join(this.dir, `receipts-${String(this.next++).padStart(10, '0')}.log`);
    this.fd = openSync(file, 'a');
    this.file = file;
    this.size = 0;
  }
}

const DONE = Promise.resolve();
