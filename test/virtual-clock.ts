/** An EngineClock on virtual time for tests of the request engine: timers fire only when the test moves time on. */
import type { EngineClock } from '@edge-mesh/client';

export class VirtualClock implements EngineClock {
  t = 0;
  private seq = 0;
  readonly timers = new Map<number, { at: number; fire: () => void }>();
  now = () => this.t;
  setTimer = (delayMs: number, fire: () => void) => {
    this.timers.set(++this.seq, { at: this.t + delayMs, fire });
    return this.seq;
  };
  clearTimer = (id: unknown) => {
    this.timers.delete(id as number);
  };
  /** Fires the timers due now, earliest first. */
  runDue() {
    for (const [id, timer] of [...this.timers].sort((a, b) => a[1].at - b[1].at)) {
      if (timer.at > this.t) break;
      this.timers.delete(id);
      timer.fire();
    }
  }
  /** Moves time on by `ms`, firing each timer that falls due on the way at its own time. */
  advance(ms: number) {
    const until = this.t + ms;
    for (;;) {
      const next = [...this.timers].sort((a, b) => a[1].at - b[1].at)[0];
      if (!next || next[1].at > until) break;
      this.t = next[1].at;
      this.timers.delete(next[0]);
      next[1].fire();
    }
    this.t = until;
  }
}
