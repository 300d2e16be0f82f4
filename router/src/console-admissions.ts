/**
 * Admissions as the operator console sees them (docs/console.md, "Admissions"): join requests waiting for the
 * operator (pending), and the admissions and revocations this router signed with the operator key it was given and
 * handed to the broker (the client layer's `sendAdminRecord`, the same path as `edge-mesh admit`).
 *
 * A join request is open to anyone (the device has no credential yet), so it is bounded and claims nothing:
 * - it names a role and a public key, and an id derived from them, so admitting it lets in only the holder of that
 *   key; a stranger who submits someone else's key gains nothing but that device's admission;
 * - its name is the requester's word, shown as text and never trusted: the operator compares the id with the one the
 *   device prints (`edge-mesh keys show`) before admitting;
 * - at most `maxPending` wait (a full list refuses new ones with MESH_RATE_LIMITED rather than evicting older ones, so
 *   a flood cannot push a real request out), at most `maxPendingPerAddress` from one address, each for `pendingTtlMs`;
 * - operator keys are never admitted this way (the broker's trusted operators come from its configuration).
 */
import type { AdminBrokerAccess } from '@edge-mesh/client';
import {
  deriveId,
  type Identity,
  isValidId,
  MeshError,
  type Role,
  type SignedRecord,
  admit as signAdmission,
  revoke as signRevocation,
} from '@edge-mesh/protocol';

/** Roles a join request may ask for. */
export const JOIN_ROLES = ['agent', 'app', 'router', 'bridge'] as const satisfies readonly Role[];
export type JoinRole = (typeof JOIN_ROLES)[number];
const MAX_NAME_CHARS = 64;
const DAY_MS = 86_400_000;

export interface ConsoleAdminOptions {
  /** The operator key that signs admissions and revocations; it must be one of the broker's trusted operators. */
  operator: Identity;
  /** The broker that applies the records. */
  brokerUrl: string;
  /**
   * TLS and password settings for that broker. `startRouter` fills in the router's own (`tls`, `username`,
   * `password`) where these are not given, so a broker with a private CA or passwords takes the console's records too.
   */
  brokerAccess?: AdminBrokerAccess;
  /** Lifetime of an admission made from the console, days (default 365). */
  ttlDays?: number;
  /** How long to wait for the broker's acknowledgement, ms (default 5 000). */
  timeoutMs?: number;
  /** Join requests kept at once (default 256), from one address (default 8), and for how long, ms (default one day). */
  maxPending?: number;
  maxPendingPerAddress?: number;
  pendingTtlMs?: number;
  /** Hands a signed record to the broker; default: the client layer's `sendAdminRecord` over MQTT. */
  send?: (signed: SignedRecord, subjectId: string) => Promise<void>;
}

/** The operator console's options (console.ts). */
export interface RouterConsoleOptions {
  /** Admit and revoke from the console with this operator key, through this broker; unset: the lists are read-only. */
  admin?: ConsoleAdminOptions;
}

export interface PendingAdmission {
  id: string;
  role: JoinRole;
  /** base64url of the 32-byte Ed25519 public key. */
  publicKey: string;
  /** The requester's own label; untrusted text. */
  name: string;
  requestedMs: number;
  address: string;
}

export interface LedgerEntry {
  id: string;
  role: Role | undefined;
  name: string;
  state: 'admitted' | 'revoked';
  /** When this router signed the record, epoch ms. */
  atMs: number;
  /** Admissions: when they run out, epoch ms. */
  expiresMs?: number;
  publicKey?: string;
}

export interface JoinRequestBody {
  role?: unknown;
  public_key?: unknown;
  name?: unknown;
}

const b64url = (bytes: Uint8Array) => Buffer.from(bytes).toString('base64url');

/** Keeps the pending join requests and this router's admission ledger; admits and revokes through the broker. */
export class ConsoleAdmissions {
  private readonly pending = new Map<string, PendingAdmission>();
  private readonly ledger = new Map<string, LedgerEntry>();
  private readonly ttlMs: number;
  private readonly timeoutMs: number;
  private readonly maxPending: number;
  private readonly maxPerAddress: number;
  private readonly pendingTtlMs: number;
  private readonly send: (signed: SignedRecord, subjectId: string) => Promise<void>;

  constructor(
    readonly options: ConsoleAdminOptions,
    defaultSend: (
      brokerUrl: string,
      operator: Identity,
      signed: SignedRecord,
      subjectId: string,
      timeoutMs: number,
      access?: AdminBrokerAccess,
    ) => Promise<unknown>,
  ) {
    if (options.operator.role !== 'operator')
      throw new MeshError('MESH_CONFIG', `the console's admin key must be an operator key, got a ${options.operator.role} key`);
    this.ttlMs = (options.ttlDays ?? 365) * DAY_MS;
    this.timeoutMs = options.timeoutMs ?? 5_000;
    this.maxPending = options.maxPending ?? 256;
    this.maxPerAddress = options.maxPendingPerAddress ?? 8;
    this.pendingTtlMs = options.pendingTtlMs ?? DAY_MS;
    this.send =
      options.send ??
      (async (signed, subjectId) => {
        await defaultSend(options.brokerUrl, options.operator, signed, subjectId, this.timeoutMs, options.brokerAccess ?? {});
      });
  }

  get operatorId(): string {
    return this.options.operator.id;
  }

  /** Takes a join request; throws MESH_BAD_REQUEST for a malformed one, MESH_RATE_LIMITED when the list is full. */
  request(body: JoinRequestBody, address: string, nowMs = Date.now()): PendingAdmission {
    this.expire(nowMs);
    const { role, public_key: publicKeyText, name = '' } = body ?? {};
    if (typeof role !== 'string' || !(JOIN_ROLES as readonly string[]).includes(role))
      throw new MeshError('MESH_BAD_REQUEST', `role must be one of ${JOIN_ROLES.join(', ')}`, { details: { field: 'role' } });
    const publicKey =
      typeof publicKeyText === 'string' && /^[A-Za-z0-9_-]{43}$/.test(publicKeyText) ? Buffer.from(publicKeyText, 'base64url') : undefined;
    if (publicKey?.byteLength !== 32)
      throw new MeshError('MESH_BAD_REQUEST', 'public_key must be a 32-byte Ed25519 key in base64url', {
        details: { field: 'public_key' },
      });
    if (typeof name !== 'string' || name.length > MAX_NAME_CHARS)
      throw new MeshError('MESH_BAD_REQUEST', `name must be text of at most ${MAX_NAME_CHARS} characters`, { details: { field: 'name' } });
    const id = deriveId(role as JoinRole, publicKey);
    const again = this.pending.get(id);
    if (again === undefined) {
      if (this.pending.size >= this.maxPending)
        throw new MeshError('MESH_RATE_LIMITED', 'too many join requests are waiting for the operator; try later', {
          details: { reason: 'pending-full' },
        });
      let fromAddress = 0;
      for (const p of this.pending.values()) if (p.address === address) fromAddress++;
      if (fromAddress >= this.maxPerAddress)
        throw new MeshError('MESH_RATE_LIMITED', 'too many join requests from this address are waiting', {
          details: { reason: 'pending-address' },
        });
    }
    const entry: PendingAdmission = { id, role: role as JoinRole, publicKey: b64url(publicKey), name, requestedMs: nowMs, address };
    this.pending.set(id, entry);
    return entry;
  }

  /** Admits a pending request (or re-admits an id this router revoked, whose key it kept) through the broker. */
  async admit(id: unknown, nowMs = Date.now()): Promise<LedgerEntry> {
    this.expire(nowMs);
    const subjectId = this.checkId(id);
    const pending = this.pending.get(subjectId);
    const known = this.ledger.get(subjectId);
    const source = pending ?? (known?.publicKey !== undefined && known.role !== undefined ? known : undefined);
    if (source === undefined)
      throw new MeshError('MESH_NOT_FOUND', `no join request from ${subjectId}: admit a device with a known key by \`edge-mesh admit\``, {
        details: { id: subjectId },
      });
    const role = source.role as Role;
    const publicKey = Buffer.from(source.publicKey!, 'base64url');
    await this.send(signAdmission(this.options.operator, { role, publicKey }, { nowMs, ttlMs: this.ttlMs }), subjectId);
    this.pending.delete(subjectId);
    const entry: LedgerEntry = {
      id: subjectId,
      role,
      name: pending?.name ?? known?.name ?? '',
      state: 'admitted',
      atMs: nowMs,
      expiresMs: nowMs + this.ttlMs,
      publicKey: b64url(publicKey),
    };
    this.ledger.set(subjectId, entry);
    return entry;
  }

  /** Revokes any id through the broker: it is disconnected at once and refused from then on. */
  async revoke(id: unknown, nowMs = Date.now()): Promise<LedgerEntry> {
    const subjectId = this.checkId(id);
    await this.send(signRevocation(this.options.operator, subjectId, nowMs), subjectId);
    const known = this.ledger.get(subjectId);
    const pending = this.pending.get(subjectId);
    this.pending.delete(subjectId);
    const entry: LedgerEntry = {
      id: subjectId,
      role: known?.role ?? pending?.role,
      name: known?.name ?? pending?.name ?? '',
      state: 'revoked',
      atMs: nowMs,
      ...((known?.publicKey ?? pending?.publicKey) !== undefined ? { publicKey: (known?.publicKey ?? pending?.publicKey)! } : {}),
    };
    this.ledger.set(subjectId, entry);
    return entry;
  }

  /** Pending requests oldest first, and this router's ledger newest first. */
  list(nowMs = Date.now()): { pending: PendingAdmission[]; ledger: LedgerEntry[] } {
    this.expire(nowMs);
    return {
      pending: [...this.pending.values()].sort((a, b) => a.requestedMs - b.requestedMs),
      ledger: [...this.ledger.values()].sort((a, b) => b.atMs - a.atMs),
    };
  }

  private checkId(id: unknown): string {
    if (typeof id !== 'string' || !isValidId(id))
      throw new MeshError('MESH_BAD_REQUEST', 'id must be a mesh id (role-base32)', { details: { field: 'id' } });
    if (id.startsWith('operator-')) throw new MeshError('MESH_BAD_REQUEST', "operators are the broker's configuration, not admissions");
    return id;
  }

  private expire(nowMs: number): void {
    for (const [id, p] of this.pending) if (nowMs - p.requestedMs > this.pendingTtlMs) this.pending.delete(id);
  }
}
