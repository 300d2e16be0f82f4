/**
 * The agent's MQTT link: one mesh connection (client/connection.ts) with the offline status as its
 * will, the agent's request, cancel and voucher topics subscribed on every (re)connect, each message
 * routed to its handler by topic, the signed status announced (retained) after each subscribe and
 * again when a client asks on `mesh/v1/discover/{id}`, and replies published to their senders.
 *
 * With a standby (AgentLinkOptions.standby, docs/operations.md "Running on a NATS cluster"), a second connection to
 * another broker of the list subscribes to the same topics and stays idle: its messages are dropped unread while the
 * first serves. When the serving connection drops, the other takes over at once, already subscribed, and announces.
 * On NATS 2.9 a CONNECT and a SUBSCRIBE wait for JetStream's leaders, which a node's death makes the cluster elect
 * again for 4 to 9 s; the standby made both before.
 */
import { randomBytes } from 'node:crypto';
import {
  type BackoffOptions,
  brokerList,
  type MeshConnection,
  type MeshConnectionOptions,
  type MeshLogger,
  openMeshConnection,
  resolveCredentials,
  subscribeOrReconnect,
  turnWriteHold,
} from '@edge-mesh/client';
import { type AgentLoad, type AgentStatus, encodeMessage, type Identity, isValidId, MeshError, topics } from '@edge-mesh/protocol';
import type { MqttClient } from 'mqtt';
import type { Faults } from './faults.ts';
import { type AgentCounters, countError } from './types.ts';

/** Replies go at QoS 1; mqtt.js copies the options it is given, so one object serves every reply. */

export type AgentTopicKind = 'request' | 'cancel' | 'voucher';

/**
 * Answers to discover messages are at most one status per this many ms: a client that floods discover
 * messages makes each agent publish at most one status a second, and a burst of newcomers is answered by one.
 */
export const DISCOVER_ANSWER_INTERVAL_MS = 1_000;
const DISCOVER_PREFIX = topics.discover('');

/**
 * Which of the agent's topics `topic` is, and the sender its last level names; undefined for any other
 * topic and for a sender that is not a mesh id. The broker lets a client publish only under its own id,
 * so the sender is authenticated.
 */
export function routeTopic(agentId: string, topic: string): { kind: AgentTopicKind; senderId: string } | undefined {
  const prefixes: [AgentTopicKind, string][] = [
    ['request', topics.agentRequest(agentId, '')],
    ['cancel', topics.agentCancel(agentId, '')],
    ['voucher', topics.agentVoucher(agentId, '')],
  ];
  for (const [kind, prefix] of prefixes) {
    if (!topic.startsWith(prefix)) continue;
    const senderId = topic.slice(prefix.length);
    return isValidId(senderId) ? { kind, senderId } : undefined;
  }
  return undefined;
}

export interface AgentLinkOptions {
  brokerUrl: string;
  brokerAccess: Pick<MeshConnectionOptions, 'tls' | 'username' | 'password' | 'subscriptionQos' | 'publishQos'>;
  identity: Identity;
  /** The agent runs on a key made for this run (it gets a different hint when refused). */
  ephemeral: boolean;
  keepaliveS: number;
  backoff: BackoffOptions | undefined;
  /** The offline status the broker publishes (retained) if the agent dies. */
  will: Buffer;
  /** Announcements are retained (AgentOptions.retainStatus). */
  retainStatus: boolean;
  /** Subscribe to vouchers too (a paying agent). */
  vouchers: boolean;
  /** The status to announce, signed as of now. */
  status: () => AgentStatus;
  handlers: Record<AgentTopicKind, (senderId: string, payload: Buffer) => void>;
  /** Deployment steps (deploy.ts): the filters to subscribe to as well, and where their messages go. */
  deployments?: { filters: string[]; onMessage: (topic: string, payload: Buffer) => void };
  /** The first CONNECT was refused as unauthorized, or its TLS handshake failed: the agent cannot run (`announced` rejects with the same error). */
  onUnauthorized: (err: MeshError) => void;
  counters: AgentCounters;
  faults: Faults;
  logger: MeshLogger;
  /**
   * Keep a second, subscribed connection to another broker of the list and fail over to it at once (see the header).
   * It needs a password (the broker must accept a second client id for the same user: the mesh's own broker and
   * RabbitMQ's auth service bind a client id to its key) and at least two brokers; otherwise it is not opened and
   * the log says why. The standby has no last will: an agent that dies while serving on it is seen offline only when
   * its heartbeats stop.
   */
  standby?: boolean;
}

/** One of the agent's connections: the first (with the will), or the standby. */
interface Link {
  name: 'primary' | 'standby';
  connection: MeshConnection;
  /** Connected and granted every subscription. */
  subscribed: boolean;
  /** Closed since it was last subscribed (false until its first close: at start it is only not ready yet). */
  down: boolean;
  /** Times in a row the standby left a broker because the primary was on it. */
  hops: number;
}

/**
 * After a connection of the agent drops (the serving one, or the other with the will) the serving one announces again
 * this long after, and again after the broker's keepalive grace: a will the broker publishes for the dropped
 * connection (at once, or once 1.5 keepalives pass without a packet, or late from a cluster) must not be the last word.
 */
const REANNOUNCE_AFTER_DROP_MS = 1_000;

export class AgentLink {
  /** Resolves when the first status has been published; rejects if the broker refuses the first CONNECT as unauthorized. */
  readonly announced: Promise<void>;
  private readonly links: Link[] = [];
  /** The link that serves: its messages are handled and everything goes out on it. */
  private active = 0;
  private readonly agentId: string;
  /** The brokers the agent's list names, in order. */
  private readonly brokerUrls: string[];
  /** Replies go to one sender: at the access's publish QoS (1 unless the engine makes it costly). */
  private readonly replyQos: { qos: 0 | 1 };
  private closed = false;
  /**
   * Holds the socket's writes from a request's arrival to this event-loop turn's check phase, so that
   * the PUBACK mqtt.js writes once the handler returns (mqtt.js lib/handlers/publish.js) and the reply of
   * a model that runs inline, which runs in that check phase (inline.ts), leave in one write, as they do
   * from an agent that answers inside the handler: one syscall, and one read at the broker, per request
   * instead of two (docs/agent.md, "The request path"). The release is a setImmediate queued behind the
   * onnxruntime setImmediate of the read's run: that run is handed over either in the handler or by the
   * inline executor's flush, a microtask the first request queued after this hold began (inline.ts,
   * "Flush order"), so the release is queued two microtasks after the hold. A paid request admitted at
   * once (payments.ts, `admitNow`) is handed over as an unpaid one is; one admitted after an await (a new grant,
   * funds not read yet, a full window) comes after the release, and its reply leaves in a write of its own.
   * One hold per turn, by the first request read in it, on the serving link's socket.
   */
  private readonly holdWrites = turnWriteHold(() => this.client.stream, 2);
  private resolveAnnounced!: () => void;
  private lastDiscoverAnswer = -Infinity;
  private discoverTimer: NodeJS.Timeout | undefined;
  /** Announcements scheduled behind a dropped connection's will (coverWill), at most one per delay. */
  private readonly willCover = new Map<number, NodeJS.Timeout>();

  constructor(private readonly options: AgentLinkOptions) {
    const { brokerUrl, identity, ephemeral, keepaliveS, backoff, will, counters, logger } = options;
    const agentId = identity.id;
    this.agentId = agentId;
    this.brokerUrls = brokerList(brokerUrl).map((b) => b.url);
    this.replyQos = { qos: options.brokerAccess.publishQos ?? 1 };
    let rejectAnnounced!: (err: MeshError) => void;
    this.announced = new Promise<void>((resolve, reject) => {
      this.resolveAnnounced = resolve;
      rejectAnnounced = reject;
    });
    // A caller that never awaits `announced` must not see an unhandled rejection.
    this.announced.catch(() => {});

    let everConnected = false;
    const primary = this.addLink('primary');
    primary.connection = openMeshConnection(brokerUrl, {
      identity,
      ...options.brokerAccess,
      keepaliveS,
      // 6 MB of heap for a speed-up mqtt.js's packet writer does not need at the agent's message rates (docs/agent.md).
      numberCache: false,
      ...(backoff ? { backoff } : {}),
      will: { topic: topics.agentStatus(agentId), payload: will, qos: 1, retain: true },
      onConnect: (c) => {
        if (everConnected) counters.reconnects++;
        logger.info({ brokerUrl, reconnect: everConnected }, everConnected ? 'reconnected to broker' : 'connected to broker');
        everConnected = true;
        // Announced only once subscribed: a status tells senders to send here.
        this.subscribeLink(primary, c);
      },
      onReconnectScheduled: (delayMs, attempt) => {
        if (!this.closed) logger.warn({ delayMs, attempt }, 'broker connection lost; reconnecting');
      },
      onRefused: (err, first) => {
        if (first && err.code === 'MESH_TLS') {
          // A handshake that failed on the first connect is configuration; retrying cannot fix it.
          rejectAnnounced(err);
          options.onUnauthorized(err);
          return;
        }
        if (first && err.code === 'MESH_UNAUTHORIZED') {
          const hint = ephemeral
            ? 'this agent runs on an ephemeral key, which only an open broker accepts: give it a key file the operator admitted'
            : 'is this agent admitted (edge-mesh admit) and not revoked?';
          const refusal = new MeshError('MESH_UNAUTHORIZED', `${err.message}; ${hint}`, { cause: err, details: { agentId } });
          rejectAnnounced(refusal);
          options.onUnauthorized(refusal);
          return;
        }
        logger.error({ code: err.code, err: err.message }, 'broker refused the connection; retrying');
      },
    });
    this.listen(primary);
    if (options.standby) this.openStandby();
  }

  /** A new link in the list; its connection is set right after, once its callbacks can name the link. */
  private addLink(name: Link['name']): Link {
    const link: Link = { name, connection: undefined as unknown as MeshConnection, subscribed: false, down: false, hops: 0 };
    this.links.push(link);
    return link;
  }

  /** The filters every connection of the agent subscribes to. */
  private filters(): string[] {
    const { vouchers, deployments } = this.options;
    const agentId = this.agentId;
    const filters = [topics.agentRequestsFor(agentId), topics.agentCancelsFor(agentId), topics.allDiscover()];
    if (vouchers) filters.push(topics.agentVouchersFor(agentId));
    if (deployments) filters.push(...deployments.filters);
    return filters;
  }

  /** Subscribes `link`; once granted, the serving link announces, and a standby takes over if nothing else serves. */
  private subscribeLink(link: Link, c: MqttClient): void {
    const { logger } = this.options;
    link.subscribed = false;
    subscribeOrReconnect(
      c,
      this.filters(),
      this.options.brokerAccess.subscriptionQos ?? 1,
      (reason) => logger.error({ err: reason, link: link.name }, 'subscribe failed; reconnecting'),
      () => {
        if (this.closed) return;
        link.subscribed = true;
        link.down = false;
        const index = this.links.indexOf(link);
        if (index === this.active) this.announce();
        // The serving link dropped and has not subscribed again: this one serves. (At start the serving link is only
        // not ready yet, and is left to finish: the standby may be granted first.)
        else if (this.servingLink().down) this.failOver(index);
        else {
          logger.info({ link: link.name }, 'connection subscribed, standing by');
          // It had dropped: the broker may have published its will (the primary's), so the serving link speaks again.
          this.coverWill();
        }
        this.checkPlacement();
      },
    );
  }

  /**
   * Keeps the standby off the primary's broker: after a node dies the primary's reconnect walks its list and can land
   * where the standby is, and the next death would then take both. The standby has no will, so it is the one that
   * moves (the primary serving meanwhile), once per other broker of the list before it settles for sharing one.
   */
  private checkPlacement(): void {
    const [primary, standby] = this.links;
    if (!primary || !standby || this.closed || !primary.subscribed || !standby.subscribed) return;
    const at = (l: Link) => {
      const stream = l.connection.client.stream as { remoteAddress?: string; remotePort?: number } | undefined;
      return stream?.remoteAddress === undefined ? undefined : `${stream.remoteAddress}:${stream.remotePort}`;
    };
    const where = at(primary);
    if (where === undefined || where !== at(standby)) {
      standby.hops = 0;
      return;
    }
    if (standby.hops >= this.brokerUrls.length - 1) return;
    standby.hops++;
    if (this.active !== 0) this.failOver(0);
    this.options.logger.info({ broker: where }, 'the standby connection shares the primary broker: moving it to the next');
    (standby.connection.client.stream as { destroy?: () => void }).destroy?.();
  }

  /** Announces on the serving link after REANNOUNCE_AFTER_DROP_MS and after the keepalive grace (see there). */
  private coverWill(): void {
    for (const delay of [REANNOUNCE_AFTER_DROP_MS, Math.ceil(1.5 * this.options.keepaliveS * 1_000) + REANNOUNCE_AFTER_DROP_MS]) {
      if (this.willCover.has(delay)) continue;
      const timer = setTimeout(() => {
        this.willCover.delete(delay);
        if (!this.closed && this.client.connected) this.announce();
      }, delay);
      timer.unref();
      this.willCover.set(delay, timer);
    }
  }

  private servingLink(): Link {
    return this.links[this.active]!;
  }

  /** The serving link's client: replies, statuses and loads go out on it. */
  private get client(): MqttClient {
    return this.servingLink().connection.client;
  }

  /** The second connection: the same subscriptions on another broker of the list, no will, messages dropped until it serves. */
  private openStandby(): void {
    const { brokerAccess, identity, keepaliveS, backoff, logger } = this.options;
    const urls = this.brokerUrls;
    // The primary's credentials (a password given, or in the URL), sent under another client id.
    const credentials = resolveCredentials(urls[0]!, brokerAccess, identity);
    const why =
      urls.length < 2
        ? 'it needs at least two broker URLs'
        : credentials.useToken || credentials.password === undefined
          ? 'it needs a broker password (--password-file): CONNECT tokens bind a client id to its key'
          : undefined;
    if (why) {
      logger.warn({}, `no standby connection: ${why}`);
      return;
    }
    const standby = this.addLink('standby');
    standby.connection = openMeshConnection([...urls.slice(1), urls[0]!], {
      ...brokerAccess,
      // A random part per run: other clients of a cluster that binds no client id to a user (NATS 2.9) cannot name it
      // to take it over, as they could an id derived from the agent's public one.
      clientId: `${this.agentId}-standby-${randomBytes(6).toString('hex')}`,
      username: credentials.username ?? this.agentId,
      password: credentials.password!,
      keepaliveS,
      numberCache: false,
      ...(backoff ? { backoff } : {}),
      onConnect: (c) => {
        logger.info({ link: 'standby' }, 'standby connection connected');
        this.subscribeLink(standby, c);
      },
      onReconnectScheduled: (delayMs, attempt) => {
        if (!this.closed) logger.info({ delayMs, attempt, link: 'standby' }, 'standby connection lost; reconnecting');
      },
      onRefused: (err) =>
        logger.error({ code: err.code, err: err.message, link: 'standby' }, 'broker refused the standby connection; retrying'),
    });
    this.listen(standby);
  }

  /** Makes link `index` the serving one and announces on it (again later, behind any late will: coverWill). */
  private failOver(index: number): void {
    const { counters, logger } = this.options;
    if (this.closed || index === this.active) return;
    const from = this.servingLink().name;
    this.active = index;
    counters.failovers++;
    logger.warn({ from, to: this.servingLink().name }, 'serving on the other connection');
    this.announce();
    this.coverWill();
  }

  /** Routes `link`'s messages while it serves; when it drops, the other link takes over if it is subscribed. */
  private listen(link: Link): void {
    const { agentId, options } = this;
    const { handlers } = options;
    const client = link.connection.client;
    client.on('close', () => {
      const wasUp = link.subscribed;
      link.subscribed = false;
      link.down = true;
      if (this.closed || this.links.length < 2) return;
      const index = this.links.indexOf(link);
      if (index === this.active) {
        const other = this.links.findIndex((l, i) => i !== index && l.subscribed && l.connection.client.connected);
        if (other >= 0) this.failOver(other);
      } else if (wasUp && link.name === 'primary') this.coverWill();
    });
    client.on('message', (topic, payload) => {
      if (this.servingLink() !== link) return;
      if (topic.startsWith(DISCOVER_PREFIX)) {
        this.answerDiscover();
        return;
      }
      const route = routeTopic(agentId, topic);
      if (!route) {
        if (options.deployments && topic.startsWith('mesh/v1/deploy/')) options.deployments.onMessage(topic, payload);
        return;
      }
      if (route.kind === 'request') this.holdWrites();
      try {
        handlers[route.kind](route.senderId, payload);
      } catch (err) {
        // A bug that one message reaches must not end the agent (mqtt.js calls this listener without a catch, so a
        // throw would be uncaught): counted, logged, and the next message is served.
        countError(options.counters, 'MESH_INTERNAL');
        options.logger.error({ err: (err as Error).message, kind: route.kind, senderId: route.senderId }, 'message handler failed');
      }
    });
  }

  /** Announces again for a discover message, at most once per DISCOVER_ANSWER_INTERVAL_MS (later ones are merged). */
  private answerDiscover(): void {
    if (this.discoverTimer !== undefined || this.closed) return;
    const waitMs = this.lastDiscoverAnswer + DISCOVER_ANSWER_INTERVAL_MS - Date.now();
    const answer = () => {
      this.discoverTimer = undefined;
      if (this.closed || !this.client.connected) return;
      this.lastDiscoverAnswer = Date.now();
      this.announce();
    };
    if (waitMs <= 0) answer();
    else {
      this.discoverTimer = setTimeout(answer, waitMs);
      this.discoverTimer.unref();
    }
  }

  get connected(): boolean {
    return this.client.connected;
  }

  /**
   * Publishes the status (retained, at QoS 1; unretained, at the publish QoS); the first that reaches the broker
   * resolves `announced`.
   */
  announce(): void {
    const retain = this.options.retainStatus;
    const qos = retain ? 1 : this.replyQos.qos;
    this.client.publish(topics.agentStatus(this.agentId), encodeMessage(this.options.status()), { qos, retain }, (err) => {
      if (err) return;
      this.options.counters.announcements++;
      this.resolveAnnounced();
    });
  }

  /** A reply to `senderId`, `afterMs` from now plus any injected link delay; dropped if the link closes first. */
  reply(senderId: string, payload: Buffer, afterMs = 0): void {
    const delay = afterMs + this.options.faults.linkDelayMs;
    if (delay > 0) {
      setTimeout(() => {
        if (!this.closed) this.client.publish(topics.clientReply(senderId, this.agentId), payload, this.replyQos);
      }, delay).unref();
    } else this.client.publish(topics.clientReply(senderId, this.agentId), payload, this.replyQos);
  }

  /** A heartbeat's load report (QoS 0: the next one replaces it); skipped while disconnected. */
  publishLoad(load: AgentLoad): void {
    if (this.client.connected) this.client.publish(topics.agentLoad(this.agentId), encodeMessage(load), { qos: 0 });
  }

  /** Publishes the offline status (waiting at most a second for the broker) and closes the connection. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.discoverTimer);
    for (const timer of this.willCover.values()) clearTimeout(timer);
    // On the serving link, or on the other if only it is up: closing cleanly throws the primary's will away.
    const up =
      this.links.find((l, i) => i === this.active && l.connection.client.connected) ??
      this.links.find((l) => l.connection.client.connected);
    if (up) {
      await new Promise<void>((resolve) => {
        up.connection.client.publish(topics.agentStatus(this.agentId), this.options.will, { qos: 1, retain: true }, () => resolve());
        setTimeout(resolve, 1_000).unref();
      });
    }
    await Promise.all(this.links.map((l) => l.connection.close()));
  }
}
