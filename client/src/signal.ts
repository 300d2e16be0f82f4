/** A "something changed" signal: waiters wake on the next change or after a timeout, whichever comes first. */
export interface ChangeSignal {
  notify(): void;
  /** Resolves on the next `notify()` or after `timeoutMs`. */
  wait(timeoutMs: number): Promise<void>;
}

export function changeSignal(): ChangeSignal {
  const waiters = new Set<() => void>();
  return {
    notify() {
      for (const w of [...waiters]) w();
    },
    wait(timeoutMs) {
      return new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          waiters.delete(done);
          resolve();
        };
        const timer = setTimeout(done, Math.max(0, timeoutMs));
        waiters.add(done);
      });
    },
  };
}
