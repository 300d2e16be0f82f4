/**
 * Serial transport: `serialport` (USB-CDC, UART, RS-485 adapters, or a pseudo-terminal) with COBS
 * framing, CRC-16 and 0x00 delimiters (link.ts). Line noise is dropped at the CRC and the deframer
 * resynchronises at the next 0x00. Each reply is written as one frame with a leading 0x00.
 */
import { SerialPort } from 'serialport';
import type { Bridge } from './bridge.ts';
import { MAX_PACKET_BYTES } from './frame.ts';
import { type DeframerCounters, encodeSerialFrame, SerialDeframer } from './link.ts';

/** What the transport needs from a port: serialport's SerialPort and SerialPortMock both fit. */
export interface BytePort {
  on(event: 'data', listener: (chunk: Buffer) => void): unknown;
  write(data: Buffer): unknown;
  close(callback?: (err?: Error | null) => void): void;
  readonly isOpen: boolean;
}

export interface SerialTransport {
  readonly path: string;
  readonly counters: DeframerCounters;
  close(): Promise<void>;
}

/** Serves the bridge on an already open port (a real one or serialport's mock). */
export function attachSerial(bridge: Bridge, port: BytePort, path = 'serial'): SerialTransport {
  const deframer = new SerialDeframer((packet) => {
    void bridge.handlePacket(packet, (reply) => {
      if (port.isOpen) port.write(encodeSerialFrame(reply));
    });
  }, MAX_PACKET_BYTES);
  port.on('data', (chunk) => deframer.push(chunk));
  return {
    path,
    counters: deframer.counters,
    close: () => new Promise<void>((resolve) => (port.isOpen ? port.close(() => resolve()) : resolve())),
  };
}

export async function openSerial(bridge: Bridge, path: string, baudRate = 115_200): Promise<SerialTransport> {
  const port = new SerialPort({ path, baudRate, autoOpen: false });
  await new Promise<void>((resolve, reject) => port.open((err) => (err ? reject(err) : resolve())));
  return attachSerial(bridge, port, path);
}
