"""Training progress on the console (`trainer.progress`).

On an interactive terminal rank 0 draws a tqdm bar on stdout: steps done / trainer.max_steps, elapsed time, ETA,
steps per second and the last step's loss. The console logger's lines (`ConsoleLogger`) are printed above the bar
through `tqdm.write`, so the two never overwrite each other.

When stdout is not a terminal (CI, SLURM log files, a pipe) there is no bar: a bar redrawn with carriage returns turns
into one unreadable line per refresh in a file. The console logger's plain lines every `trainer.log_every` steps are
the progress report there; they carry the ETA (`eta` field) too.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

__all__ = ["Progress", "is_terminal"]


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal (False for files, pipes and streams without `isatty`)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """A step progress bar when `enabled` and the stream is a terminal; otherwise every method does nothing.

    `total`: the step training ends at; `initial`: the step it starts from (a resumed run starts part-way).
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, stream: Optional[TextIO] = None):
        stream = stream if stream is not None else sys.stdout
        self._bar = None
        if enabled and is_terminal(stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, file=stream, desc="train", unit="step",
                             dynamic_ncols=True, leave=True)

    @property
    def active(self) -> bool:
        return self._bar is not None

    def update(self, step: int, metrics: Optional[dict] = None) -> None:
        """Move the bar to `step` (steps completed); show the step's loss if `metrics` has one."""
        if self._bar is None:
            return
        loss = (metrics or {}).get("loss")
        if isinstance(loss, (int, float)):
            self._bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
