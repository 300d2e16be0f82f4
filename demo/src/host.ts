/**
 * Facts about this machine that tests and benchmarks share: a free TCP port to start a server on, and where an
 * installed command lives (Debian puts daemons such as mosquitto in /usr/sbin, outside a normal user's PATH).
 */
import { execFileSync } from 'node:child_process';
import net from 'node:net';

/** A TCP port free on `host` right now (the kernel's pick for port 0, released again). */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on('error', reject);
    server.listen(0, host, () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** The path of `bin` on PATH, or in /usr/sbin; undefined when it is in neither. */
export function installedCommand(bin: string): string | undefined {
  try {
    return (
      execFileSync('sh', ['-c', `command -v ${bin} || { [ -x /usr/sbin/${bin} ] && echo /usr/sbin/${bin}; }`], {
        encoding: 'utf8',
      }).trim() || undefined
    );
  } catch {
    return undefined;
  }
}
