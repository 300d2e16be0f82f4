/** Request counters and latency windows the sample app reports, per model and per agent. */
import { round, summarize } from '@edge-mesh/client';

export class Tally {
  requests = 0;
  ok = 0;
  errors = 0;
  private window: number[] = [];
  private all: number[] = [];

  record(latencyMs: number | undefined): void {
    this.requests++;
    if (latencyMs === undefined) {
      this.errors++;
      return;
    }
    this.ok++;
    this.window.push(latencyMs);
    this.all.push(latencyMs);
  }

  /** Latency of the successes since the last call. */
  takeWindow(): { n: number; p50: number; p99: number } {
    const s = summarize(this.window);
    this.window = [];
    return { n: s.n, p50: s.p50, p99: s.p99 };
  }

  total(): { requests: number; ok: number; errors: number; p50_ms: number | null; p99_ms: number | null } {
    const s = summarize(this.all);
    return {
      requests: this.requests,
      ok: this.ok,
      errors: this.errors,
      p50_ms: s.n ? round(s.p50) : null,
      p99_ms: s.n ? round(s.p99) : null,
    };
  }
}

export class TallyMap {
  readonly byKey = new Map<string, Tally>();

  get(key: string): Tally {
    let t = this.byKey.get(key);
    if (!t) {
      t = new Tally();
      this.byKey.set(key, t);
    }
    return t;
  }
}

/** Fixed-width text table for the periodic report. */
export function formatTable(header: string[], rows: (string | number)[][]): string {
  const cells = [header, ...rows.map((r) => r.map(String))];
  const widths = header.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  return cells.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ')).join('\n');
}
