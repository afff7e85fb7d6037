"""Training progress for people: a progress bar on a terminal, plain lines when the output goes to a file.

A redrawing bar written to a pipe or a log file is kilobytes of carriage returns; there every ``every`` steps
(and at the last) one line is printed instead: step, loss, images per second and the estimated time left.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class TrainProgress:
    """``update(step, loss, images_per_second)`` after each step; ``note(text)`` for an event line."""

    def __init__(self, total: int, initial: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total, self.enabled = total, enabled
        self.stream = sys.stdout if stream is None else stream
        self.plain = enabled and not is_terminal(self.stream)
        # about 20 lines for a long run, every 10 steps for a short one
        self.every = max(10, total // 200 * 10)
        self._bar = None
        if enabled and not self.plain:
            self._bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=self.stream)
        self._start_step, self._start_time = initial, time.perf_counter()

    def update(self, step: int, loss: float | None, images_per_second: float | None) -> None:
        if self._bar is not None:
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_second or 0:.0f}")
            self._bar.update(1)
            return
        if not self.plain or (step % self.every and step != self.total):
            return
        done = step - self._start_step
        elapsed = time.perf_counter() - self._start_time
        eta = elapsed / done * (self.total - step) if done else 0.0
        parts = [f"step {step:>{len(str(self.total))}}/{self.total}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if images_per_second is not None:
            parts.append(f"{images_per_second:.0f} img/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        parts.append(f"ETA {_duration(eta)}")
        print("  ".join(parts), file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
