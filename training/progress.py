"""The live progress bar of an epoch on a terminal; silent when stderr is not a terminal (CI, logs)."""

from __future__ import annotations

import sys
import time


class Progress:
    """A live bar on a terminal (loss, accuracy, images/s, ETA); nothing between epochs otherwise."""

    def __init__(self, total_steps: int, prefix: str, stream=None):
        # sys.stderr looked up now, not at import: it may have been replaced since (pytest, notebooks)
        stream = sys.stderr if stream is None else stream
        self.total, self.prefix, self.stream = total_steps, prefix, stream
        self.live = stream.isatty()
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def due(self, step: int) -> bool:
        """Whether update() would draw now: the loop asks before it reads the device's numbers (a host sync)."""
        return self.live and (time.perf_counter() - self.last_draw >= 0.1 or step >= self.total)

    def update(self, step: int, loss: float, acc: float, seen: int) -> None:
        now = time.perf_counter()
        if not self.live or (now - self.last_draw < 0.1 and step < self.total):
            return
        self.last_draw = now
        elapsed = now - self.start
        eta = elapsed / step * (self.total - step) if step else 0.0
        filled = int(24 * step / self.total)
        self.stream.write(f"\r{self.prefix} [{'#' * filled}{'.' * (24 - filled)}] {step}/{self.total} "
                          f"loss {loss:.4f} acc {acc:.4f} {seen / max(elapsed, 1e-9):,.0f} img/s ETA {eta:4.0f}s ")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()
