/**
 * Binary min-heap of simulator events ordered by (time, insertion sequence), so events at the same
 * virtual millisecond run in the order they were scheduled: deterministic, no ties left to chance.
 */
export interface SimEvent {
  t: number;
  seq: number;
  kind: number;
  a: number;
  b: number;
}

export class EventHeap {
  private items: SimEvent[] = [];
  private seq = 0;

  get size(): number {
    return this.items.length;
  }

  push(t: number, kind: number, a = 0, b = 0): void {
    const ev: SimEvent = { t, seq: this.seq++, kind, a, b };
    const h = this.items;
    let i = h.length;
    h.push(ev);
    while (i > 0) {
      const p = (i - 1) >> 1;
      const parent = h[p]!;
      if (parent.t < t || (parent.t === t && parent.seq < ev.seq)) break;
      h[i] = parent;
      i = p;
    }
    h[i] = ev;
  }

  pop(): SimEvent | undefined {
    const h = this.items;
    const top = h[0];
    if (top === undefined) return undefined;
    const last = h.pop()!;
    if (h.length > 0) {
      let i = 0;
      const n = h.length;
      for (;;) {
        const l = 2 * i + 1;
        if (l >= n) break;
        const r = l + 1;
        let c = l;
        const cl = h[l]!;
        if (r < n) {
          const cr = h[r]!;
          if (cr.t < cl.t || (cr.t === cl.t && cr.seq < cl.seq)) c = r;
        }
        const child = h[c]!;
        if (last.t < child.t || (last.t === child.t && last.seq < child.seq)) break;
        h[i] = child;
        i = c;
      }
      h[i] = last;
    }
    return top;
  }
}
