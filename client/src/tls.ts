/**
 * TLS for every mesh client (docs/operations.md, "TLS"): the CA that signs the server's certificate, and for mutual
 * TLS this client's certificate and key, read from PEM files; and how a failed handshake becomes a coded MeshError
 * (MESH_TLS) instead of a silent reconnect loop.
 */
import { readFile } from 'node:fs/promises';
import { MeshError } from '@edge-mesh/protocol';

/** PEM text or bytes, as `tls.connect` takes them. */
export interface MeshTlsOptions {
  /** CA certificate(s) that sign the server's certificate. Unset: Node's bundled public CAs. */
  ca?: string | Buffer;
  /** This client's certificate chain, for a server that asks for one (mutual TLS). Needs `key`. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** Name the server's certificate must carry, when it is not the URL's host. */
  servername?: string;
}

/** The `--tls-ca/--tls-cert/--tls-key` file paths of a command. */
export interface TlsFiles {
  ca?: string | undefined;
  cert?: string | undefined;
  key?: string | undefined;
}

/** Reads the PEM files; undefined when none is given. MESH_CONFIG for a file that cannot be read or a cert without its key. */
export async function loadTlsFiles(files: TlsFiles): Promise<MeshTlsOptions | undefined> {
  if (files.ca === undefined && files.cert === undefined && files.key === undefined) return undefined;
  if ((files.cert === undefined) !== (files.key === undefined))
    throw new MeshError('MESH_CONFIG', '--tls-cert and --tls-key go together (a certificate and its private key)');
  const read = async (what: string, file: string | undefined): Promise<Buffer | undefined> => {
    if (file === undefined) return undefined;
    try {
      return await readFile(file);
    } catch (cause) {
      throw new MeshError('MESH_CONFIG', `cannot read the TLS ${what} ${file}: ${(cause as Error).message}`, { cause, details: { file } });
    }
  };
  const [ca, cert, key] = await Promise.all([read('CA', files.ca), read('certificate', files.cert), read('key', files.key)]);
  return { ...(ca ? { ca } : {}), ...(cert ? { cert } : {}), ...(key ? { key } : {}) };
}

/** OpenSSL's certificate verification results as Node names them (node/src/crypto/crypto_common.cc). */
const VERIFY_CODES = new Set([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_CRL',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY',
  'CERT_SIGNATURE_FAILURE',
  'CERT_NOT_YET_VALID',
  'CERT_HAS_EXPIRED',
  'ERROR_IN_CERT_NOT_BEFORE_FIELD',
  'ERROR_IN_CERT_NOT_AFTER_FIELD',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'CERT_CHAIN_TOO_LONG',
  'CERT_REVOKED',
  'INVALID_CA',
  'PATH_LENGTH_EXCEEDED',
  'INVALID_PURPOSE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'HOSTNAME_MISMATCH',
]);

/**
 * The MESH_TLS error for a failed TLS handshake as Node or mqtt.js report it, or undefined for any other error.
 * `details.reason` is Node's code (e.g. `UNABLE_TO_VERIFY_LEAF_SIGNATURE`, `ERR_SSL_WRONG_VERSION_NUMBER`).
 */
export function describeTlsFailure(err: unknown, url: string, connectedBefore = false): MeshError | undefined {
  const e = err as { code?: unknown; message?: unknown } | null;
  if (!e || typeof e.message !== 'string') return undefined;
  const code = typeof e.code === 'string' ? e.code : undefined;
  let hint: string;
  if (code !== undefined && (VERIFY_CODES.has(code) || code === 'ERR_TLS_CERT_ALTNAME_INVALID')) {
    hint = 'the server certificate is not trusted here: pass the CA that signed it (--tls-ca) and connect by a name it carries';
  } else if (code === 'ERR_SSL_WRONG_VERSION_NUMBER' || code === 'ERR_SSL_PACKET_LENGTH_TOO_LONG') {
    hint = 'the server does not speak TLS on this port: use mqtt:// for a plaintext listener, or the TLS port';
  } else if (code !== undefined && /CERTIFICATE_REQUIRED|BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_UNKNOWN/.test(code)) {
    hint = 'the server refused this client certificate: pass one its CA signed (--tls-cert, --tls-key)';
  } else if (code !== undefined && (code.startsWith('ERR_SSL_') || code.startsWith('ERR_TLS_'))) {
    hint = 'the TLS handshake failed';
  } else if (e.message === 'TLS not authorized') {
    hint = 'the server certificate is not trusted here: pass the CA that signed it (--tls-ca)';
  } else {
    return undefined;
  }
  const reason = code ?? 'TLS_NOT_AUTHORIZED';
  return new MeshError('MESH_TLS', `TLS with ${redactUrl(url)} failed (${reason}): ${hint}`, {
    cause: err,
    details: { reason, url: redactUrl(url), ...(connectedBefore ? { connectedBefore } : {}) },
  });
}

/** The URL without its password, for messages and logs. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password !== '') u.password = '***';
    return u.toString().replace(/\/$/, '');
  } catch {
    return '(unparseable URL)';
  }
}
