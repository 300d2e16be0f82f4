/**
 * The one MQTT connection recipe every mesh client shares (agent, SDK, later router and bridge).
 * It is the only I/O in protocol/, kept here because its rules are part of the transport contract:
 * MQTT 3.1.1, clean sessions, TCP_NODELAY on every (re)connect, and jittered exponential reconnects.
 */
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { MQTT_PROTOCOL_VERSION, reconnectDelayMs, type BackoffOptions } from './transport.ts';

export interface MeshConnectionOptions {
  clientId: string;
  keepaliveS?: number;
  connectTimeoutMs?: number;
  backoff?: BackoffOptions;
  will?: IClientOptions['will'];
  /** Called on every successful (re)connect, before anything else runs on it. */
  onConnect?: (client: MqttClient) => void;
  onReconnectScheduled?: (delayMs: number, attempt: number) => void;
}

export interface MeshConnection {
  client: MqttClient;
  /** Resolves on the first successful connect. */
  firstConnect: Promise<void>;
  close(): Promise<void>;
}

export function openMeshConnection(brokerUrl: string, options: MeshConnectionOptions): MeshConnection {
  const { clientId, keepaliveS = 10, connectTimeoutMs = 5_000, backoff, will, onConnect, onReconnectScheduled } = options;
  const client = mqtt.connect(brokerUrl, {
    clientId,
    protocolVersion: MQTT_PROTOCOL_VERSION,
    clean: true,
    keepalive: keepaliveS,
    connectTimeout: connectTimeoutMs,
    // Reconnects are scheduled below with jitter; mqtt.js's own timer has a fixed period.
    reconnectPeriod: 0,
    resubscribe: false,
    queueQoSZero: false,
    ...(will ? { will } : {}),
  });
  let attempt = 0;
  let closed = false;
  let timer: NodeJS.Timeout | undefined;
  let resolveFirst!: () => void;
  const firstConnect = new Promise<void>((resolve) => (resolveFirst = resolve));

  client.on('connect', () => {
    attempt = 0;
    // mqtt.js never sets TCP_NODELAY; without it small request bursts stall on delayed ACKs.
    (client.stream as { setNoDelay?: (on: boolean) => void }).setNoDelay?.(true);
    onConnect?.(client);
    resolveFirst();
  });
  client.on('close', () => {
    if (closed || timer) return;
    const delayMs = reconnectDelayMs(attempt++, backoff);
    onReconnectScheduled?.(delayMs, attempt);
    timer = setTimeout(() => {
      timer = undefined;
      if (!closed) client.reconnect();
    }, delayMs);
  });
  // Errors (refused connection, protocol errors) are followed by 'close', which reconnects.
  client.on('error', () => {});

  return {
    client,
    firstConnect,
    close: () => {
      closed = true;
      if (timer) clearTimeout(timer);
      return new Promise<void>((resolve) => {
        if (client.disconnected || !client.connected) {
          client.end(true, {}, () => resolve());
        } else {
          client.end(false, {}, () => resolve());
        }
      });
    },
  };
}
