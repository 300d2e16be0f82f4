/** UDP transport: one packet per datagram (the UDP checksum covers line errors), replies go back to the sender's address. */
import dgram from 'node:dgram';
import type { Bridge } from './bridge.ts';

/** The bridge's default UDP port (next to CoAP's 5683/5684). */
export const DEFAULT_UDP_PORT = 5685;

export interface UdpTransport {
  readonly port: number;
  readonly address: string;
  close(): Promise<void>;
}

export async function listenUdp(bridge: Bridge, { port = DEFAULT_UDP_PORT, host = '127.0.0.1' } = {}): Promise<UdpTransport> {
  const socket = dgram.createSocket({ type: host.includes(':') ? 'udp6' : 'udp4' });
  socket.on('message', (msg, rinfo) => {
    void bridge.handlePacket(msg, (reply) => socket.send(reply, rinfo.port, rinfo.address));
  });
  socket.on('error', () => {
    /* ICMP unreachable and the like: the device retransmits */
  });
  await new Promise<void>((resolve, reject) => {
    socket.once('error', reject);
    socket.bind(port, host, () => {
      socket.off('error', reject);
      resolve();
    });
  });
  const addr = socket.address();
  return {
    port: addr.port,
    address: addr.address,
    close: () => new Promise<void>((resolve) => socket.close(() => resolve())),
  };
}
