/**
 * The bridge's device registry, kept in `level` and mirrored in memory.
 *
 * A device has a random non-zero u32 id (what its frames carry), a long id `dev-<8 hex>` used in mesh
 * topics, a 32-byte ChaCha20-Poly1305 key, a label, and its replay high-water mark (epoch and
 * sequence floor) so a bridge restart cannot reopen the replay window. Revoked devices stay in the
 * registry, marked, so their id is never handed out again and their frames are refused.
 *
 * Keys are stored in the clear in the registry folder (mode 0700): protect it like a key file.
 */
import { randomBytes } from 'node:crypto';
import { chmod, mkdir } from 'node:fs/promises';
import { MeshError } from '@edge-mesh/protocol';
import { Level } from 'level';
import { KEY_BYTES } from './frame.ts';

export interface DeviceRecord {
  deviceId: number;
  longId: string;
  name: string;
  /** 32-byte key, hex. */
  key: string;
  createdAt: number;
  revokedAt?: number;
  /** Replay high-water mark. */
  epoch: number;
  seqFloor: number;
}

export function longIdOf(deviceId: number): string {
  return `dev-${(deviceId >>> 0).toString(16).padStart(8, '0')}`;
}

/** Accepts a device id as a number, `0x…` hex, or a long id `dev-xxxxxxxx`. */
export function parseDeviceRef(ref: string | number): number | undefined {
  if (typeof ref === 'number') return Number.isInteger(ref) && ref > 0 && ref <= 0xffffffff ? ref : undefined;
  const m = /^dev-([0-9a-f]{8})$/.exec(ref) ?? /^0x([0-9a-fA-F]{1,8})$/.exec(ref);
  const n = m ? Number.parseInt(m[1]!, 16) : /^\d+$/.test(ref) ? Number(ref) : NaN;
  return Number.isInteger(n) && n > 0 && n <= 0xffffffff ? n : undefined;
}

export class DeviceRegistry {
  private readonly devices = new Map<number, DeviceRecord>();
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(private readonly db: Level<string, string> | undefined) {}

  /** Opens (creating) the registry in `dir`. Only one process can hold it open at a time. */
  static async open(dir: string): Promise<DeviceRegistry> {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await chmod(dir, 0o700).catch(() => {});
    const db = new Level<string, string>(dir, { keyEncoding: 'utf8', valueEncoding: 'utf8' });
    try {
      await db.open();
    } catch (err) {
      const cause = (err as { cause?: { code?: string } }).cause;
      const hint = cause?.code === 'LEVEL_LOCKED' ? ' (is a bridge running on this registry? stop it first)' : '';
      throw new MeshError('MESH_CONFIG', `cannot open the device registry in ${dir}${hint}: ${(err as Error).message}`, {
        cause: err,
        details: { dir },
      });
    }
    const registry = new DeviceRegistry(db);
    for await (const [, value] of db.iterator({ gte: 'dev!', lt: 'dev"' })) {
      const record = JSON.parse(value) as DeviceRecord;
      registry.devices.set(record.deviceId, record);
    }
    return registry;
  }

  /** A registry held in memory only (tests, benchmarks, the simulated device of `npm start`). */
  static inMemory(records: DeviceRecord[] = []): DeviceRegistry {
    const registry = new DeviceRegistry(undefined);
    for (const r of records) registry.devices.set(r.deviceId, r);
    return registry;
  }

  get(deviceId: number): DeviceRecord | undefined {
    return this.devices.get(deviceId);
  }

  list(): DeviceRecord[] {
    return [...this.devices.values()].sort((a, b) => a.createdAt - b.createdAt);
  }

  private write(record: DeviceRecord): Promise<void> {
    const run = this.queue.then(() =>
      this.db?.put(`dev!${record.deviceId.toString(16).padStart(8, '0')}`, JSON.stringify(record), { sync: true }),
    );
    this.queue = run.catch(() => {});
    return run;
  }

  /** Creates a device with a fresh random id and key. */
  async provision(options: { name?: string; deviceId?: number; key?: Uint8Array } = {}): Promise<DeviceRecord> {
    let deviceId = options.deviceId;
    if (deviceId !== undefined && this.devices.has(deviceId)) {
      throw new MeshError('MESH_BAD_REQUEST', `device ${longIdOf(deviceId)} already exists`, { details: { device: longIdOf(deviceId) } });
    }
    while (deviceId === undefined || deviceId === 0 || this.devices.has(deviceId)) deviceId = randomBytes(4).readUInt32LE(0);
    const key = options.key ?? randomBytes(KEY_BYTES);
    if (key.byteLength !== KEY_BYTES) throw new MeshError('MESH_BAD_REQUEST', 'a device key has 32 bytes', { details: { field: 'key' } });
    const record: DeviceRecord = {
      deviceId,
      longId: longIdOf(deviceId),
      name: options.name ?? longIdOf(deviceId),
      key: Buffer.from(key).toString('hex'),
      createdAt: Date.now(),
      epoch: 0,
      seqFloor: 0,
    };
    await this.write(record);
    this.devices.set(deviceId, record);
    return record;
  }

  async revoke(deviceId: number): Promise<DeviceRecord> {
    const record = this.devices.get(deviceId);
    if (!record) throw new MeshError('MESH_NOT_FOUND', `no device ${longIdOf(deviceId)}`, { details: { device: longIdOf(deviceId) } });
    const next = { ...record, revokedAt: record.revokedAt ?? Date.now() };
    await this.write(next);
    this.devices.set(deviceId, next);
    return next;
  }

  /** Persists a replay high-water mark (written ahead of use; see replay.ts). */
  async saveMark(deviceId: number, epoch: number, seqFloor: number): Promise<void> {
    const record = this.devices.get(deviceId);
    if (!record) return;
    const next = { ...record, epoch, seqFloor };
    this.devices.set(deviceId, next);
    await this.write(next);
  }

  async close(): Promise<void> {
    await this.queue;
    await this.db?.close();
  }
}
