/**
 * AgentOptions with their defaults filled in and checked: every problem in one MESH_CONFIG error,
 * before anything is loaded or opened.
 */
import type { BackoffOptions } from '@edge-mesh/client';
import {
  assertValidId,
  DEFAULT_MAX_ELEMENTS,
  DEFAULT_MAX_MESSAGE_BYTES,
  generateIdentity,
  type Identity,
  MeshError,
} from '@edge-mesh/protocol';
import { newStackingCounters, type StackingCounters } from './executor.ts';
import { DEFAULT_MAX_DEADLINE_MS } from './requests.ts';
import type { AgentOptions } from './types.ts';

export interface ResolvedOptions {
  brokerUrl: string;
  /** TLS and password credentials for the broker, passed to the connection as given. */
  brokerAccess: Pick<AgentOptions, 'tls' | 'username' | 'password' | 'subscriptionQos' | 'publishQos'>;
  modelsDir: string;
  identity: Identity;
  /** The identity was made for this run (no key given). */
  ephemeral: boolean;
  agentId: string;
  workers: number;
  intraOpThreads: number;
  queueLimit: number;
  admission: boolean;
  retainStatus: boolean;
  standbyConnection: boolean;
  pipelineDepth: number;
  heartbeatMs: number;
  warmupRuns: number;
  loadNice: number;
  providers: 'auto' | string[];
  maxMessageBytes: number;
  maxElements: number;
  keepaliveS: number;
  backoff: BackoffOptions | undefined;
  awaitAnnounce: boolean;
  maxRememberedRequests: number;
  maxDeadlineMs: number;
  inlineMaxMs: number;
  inlineBatchMax: number;
  /** Where the agent's inline executors count their stacked runs (AgentCounters.stacked). */
  stacking: StackingCounters;
}

/** Default bound on a model's warm-up p99 for it to run on the main thread (docs/agent.md, "Inline models"). */
export const DEFAULT_INLINE_MAX_MS = 0.5;

/** Default bound on the requests one stacked inline run takes (docs/agent.md, "Batching inline runs"). */
export const DEFAULT_INLINE_BATCH_MAX = 16;

/** Nice value added to the worker threads while they load and warm models (docs/agent.md, "Starting without starving the neighbours"). */
export const DEFAULT_LOAD_NICE = 10;

const positiveInteger = (n: number) => Number.isInteger(n) && n >= 1;

export function resolveOptions(options: AgentOptions): ResolvedOptions {
  const {
    brokerUrl,
    modelsDir,
    workers = 1,
    intraOpThreads = 1,
    queueLimit = 64,
    admission = true,
    retainStatus = true,
    standbyConnection = false,
    pipelineDepth = 2,
    heartbeatMs = 1_000,
    warmupRuns = 5,
    loadNice = DEFAULT_LOAD_NICE,
    providers = 'auto',
    maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES,
    maxElements = DEFAULT_MAX_ELEMENTS,
    keepaliveS = 10,
    backoff,
    awaitAnnounce = true,
    maxRememberedRequests = 100_000,
    maxDeadlineMs = DEFAULT_MAX_DEADLINE_MS,
    inlineMaxMs = DEFAULT_INLINE_MAX_MS,
    inlineBatchMax = DEFAULT_INLINE_BATCH_MAX,
  } = options;
  if ('agentId' in options) {
    throw new MeshError(
      'MESH_CONFIG',
      'the agentId option was replaced by identity: an agent id derives from its key (see generateIdentity, parseKeyFile)',
    );
  }
  const ephemeral = options.identity === undefined;
  const identity = options.identity ?? generateIdentity('agent');
  if (identity.role !== 'agent')
    throw new MeshError('MESH_CONFIG', `an agent needs an agent key, got a ${identity.role} key (${identity.id})`);
  const agentId = assertValidId(identity.id, 'agent id');
  const problems: string[] = [];
  if (!positiveInteger(workers)) problems.push(`workers must be a positive integer, got ${workers}`);
  if (!positiveInteger(queueLimit)) problems.push(`queueLimit must be a positive integer, got ${queueLimit}`);
  if (!positiveInteger(pipelineDepth)) problems.push(`pipelineDepth must be a positive integer, got ${pipelineDepth}`);
  if (!positiveInteger(maxRememberedRequests))
    problems.push(`maxRememberedRequests must be a positive integer, got ${maxRememberedRequests}`);
  if (!positiveInteger(maxDeadlineMs)) problems.push(`maxDeadlineMs must be a positive integer, got ${maxDeadlineMs}`);
  if (!(heartbeatMs >= 50)) problems.push(`heartbeatMs must be at least 50, got ${heartbeatMs}`);
  if (!positiveInteger(warmupRuns)) problems.push(`warmupRuns must be a positive integer, got ${warmupRuns}`);
  if (!(Number.isInteger(loadNice) && loadNice >= 0 && loadNice <= 19))
    problems.push(`loadNice must be an integer from 0 to 19, got ${loadNice}`);
  if (!(Number.isFinite(inlineMaxMs) && inlineMaxMs >= 0))
    problems.push(`inlineMaxMs must be a number of milliseconds, 0 or more, got ${inlineMaxMs}`);
  if (!(positiveInteger(inlineBatchMax) && inlineBatchMax <= 1024))
    problems.push(`inlineBatchMax must be an integer from 1 to 1024, got ${inlineBatchMax}`);
  const { metricsPort } = options;
  if (metricsPort !== undefined && !(Number.isInteger(metricsPort) && metricsPort >= 0 && metricsPort <= 65_535))
    problems.push(`metricsPort must be a port number from 0 to 65535, got ${metricsPort}`);
  if (problems.length) throw new MeshError('MESH_CONFIG', `invalid agent options: ${problems.join('; ')}`);
  return {
    brokerUrl,
    brokerAccess: {
      ...(options.tls ? { tls: options.tls } : {}),
      ...(options.username !== undefined ? { username: options.username } : {}),
      ...(options.password !== undefined ? { password: options.password } : {}),
      ...(options.subscriptionQos !== undefined ? { subscriptionQos: options.subscriptionQos } : {}),
      ...(options.publishQos !== undefined ? { publishQos: options.publishQos } : {}),
    },
    modelsDir,
    identity,
    ephemeral,
    agentId,
    workers,
    intraOpThreads,
    queueLimit,
    admission,
    retainStatus,
    standbyConnection,
    pipelineDepth,
    heartbeatMs,
    warmupRuns,
    loadNice,
    providers,
    maxMessageBytes,
    maxElements,
    keepaliveS,
    backoff,
    awaitAnnounce,
    maxRememberedRequests,
    maxDeadlineMs,
    inlineMaxMs,
    inlineBatchMax,
    stacking: newStackingCounters(),
  };
}
