/**
 * Every place the broker reaches past aedes 1.2's documented API, in one file, so an aedes upgrade has one place to
 * check. Each function says which internal it relies on and why the public API does not suffice.
 */
import type { Duplex } from 'node:stream';
import type { Aedes, AuthenticateError, Client, ConnectPacket, PublishPacket } from 'aedes';
import type { MeshSession } from './acl.ts';
import { releaseSubscriptions, type SubscribeEntry, unifyDuplicateFilters } from './handlers/subscribe.ts';

/** The per-connection state the broker caches on each aedes client once its CONNECT is accepted. */
const SESSION = Symbol('edge-mesh.session');
type MeshClient = Client & { [SESSION]?: MeshSession; will?: unknown; _parser?: NodeJS.EventEmitter };

/** The session attached by `setSession`; undefined before authentication succeeded. */
export function sessionOf(client: Client): MeshSession | undefined {
  return (client as MeshClient)[SESSION];
}

/** aedes has no per-client user data slot, so the session rides on the client object under a private symbol. */
export function setSession(client: Client, session: MeshSession): void {
  (client as MeshClient)[SESSION] = session;
}

/**
 * The connected client with `id`, if any. aedes keeps its clients by id in `aedes.clients` (typed loosely in aedes
 * 1.2's .d.ts and not documented), and has no other way to find one to disconnect it after a revocation.
 */
export function liveClient(aedes: Aedes, id: string): Client | undefined {
  return (aedes as unknown as { clients: Record<string, Client> }).clients[id];
}

/**
 * Whether `packet` is the client's own will being published as it goes. aedes passes the stored will object itself
 * (`client.will`, undocumented) to authorizePublish, so identity is the only way to tell it from a PUBLISH packet.
 */
export function isOwnWill(client: Client, packet: PublishPacket): boolean {
  return packet === (client as MeshClient).will;
}

/**
 * The owner of an orphaned will: aedes calls authorizePublish with a null client for a stored will whose owner's
 * broker vanished, and the stored packet keeps its owner's id in an undeclared `clientId` field.
 */
export function orphanWillOwner(packet: PublishPacket): string | undefined {
  return (packet as { clientId?: string }).clientId;
}

/**
 * aedes checks the protocol level itself after preConnect and answers CONNACK 1 (unacceptable protocol version) for
 * levels it does not know. It accepts 3 (MQTT 3.1), which the mesh refuses; lowering the level makes aedes answer
 * CONNACK 1 for it too, as [MQTT-3.1.2-2] asks, before authenticate runs.
 */
export function answerUnacceptableProtocol(packet: ConnectPacket): void {
  packet.protocolVersion = 0 as never;
}

/**
 * aedes answers a keepalive over its limit (or 0) itself, after preConnect and before authenticate, with return code
 * 6, which MQTT 3.1.1 does not have. For a CONNECT the broker already refused, pass aedes' check so that
 * authenticate answers CONNACK 5 with the reason logged; the session never starts, so the value is moot.
 */
export function passAedesKeepaliveCheck(packet: ConnectPacket): void {
  packet.keepalive = 1;
}

/** The error aedes' authenticate callback takes: its `returnCode` (2 to 5) becomes the CONNACK return code. */
export function authenticateError<E extends Error>(error: E, returnCode: number): AuthenticateError {
  return Object.assign(error, { returnCode }) as unknown as AuthenticateError;
}

/** The aedes client aedes.handle() attached to a socket (`socket.client`, undocumented), for log lines. */
export function clientOfSocket(socket: Duplex): Client | undefined {
  return (socket as Duplex & { client?: Client }).client;
}

/**
 * aedes fixes a SUBSCRIBE's granted QoS (sent in the SUBACK) before authorizeSubscribe runs, so downgrading there
 * alone would deliver at QoS 1 while the SUBACK claims 2. Lower the requested QoS as the packet is parsed instead,
 * through the parser aedes keeps on each client (`client._parser`; authorizeSubscribe still downgrades too).
 *
 * The same listener sees each UNSUBSCRIBE, which aedes has no hook for: its filters free their room under
 * `maxSubscriptions` (./handlers/subscribe.ts) before aedes handles it, so a SUBSCRIBE that follows it, in the same
 * read or later, finds the room. One parsed before the client's CONNECT was accepted (it has no session yet) frees
 * nothing: a client that subscribes and unsubscribes before its CONNACK only narrows its own room.
 */
export function downgradeSubscribeQoS(client: Client, granted: (qos: number) => number): void {
  const parser = (client as MeshClient)._parser;
  if (!parser || typeof parser.prependListener !== 'function') return;
  parser.prependListener('packet', (packet: { cmd: string; subscriptions?: SubscribeEntry[]; unsubscriptions?: string[] }) => {
    if (packet.cmd === 'unsubscribe' && packet.unsubscriptions) {
      const session = sessionOf(client);
      if (session) releaseSubscriptions(session, packet.unsubscriptions);
      return;
    }
    if (packet.cmd !== 'subscribe' || !packet.subscriptions) return;
    for (const sub of packet.subscriptions) sub.qos = granted(sub.qos);
    keepEverySubscription(packet as { subscriptions: SubscribeEntry[] });
  });
}

/**
 * One SUBACK return code per filter asked for, duplicates included (./handlers/subscribe.ts, unifyDuplicateFilters):
 * aedes replaces `packet.subscriptions` with its de-duplicated list before it authorizes them and builds the SUBACK
 * from that list (lib/handlers/subscribe.js, handleSubscribe), so the full list is kept and that assignment ignored.
 */
function keepEverySubscription(packet: { subscriptions: SubscribeEntry[] }): void {
  if (!unifyDuplicateFilters(packet.subscriptions)) return;
  const all = packet.subscriptions;
  Object.defineProperty(packet, 'subscriptions', { get: () => all, set: () => {}, enumerable: true, configurable: true });
}
