"""Progress for people (a tqdm bar on stderr) and for machines (one JSON object per line).

Each logging step writes `{"event": "step", "step", "loss", "lr", "steps_per_s", ...}` to stdout and appends it to
`<output>/progress.jsonl`, which the server's training manager reads. Other events (start, checkpoint, validation,
stopped, done) use the same line format. Only the main process reports.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

PROGRESS_FILE = "progress.jsonl"


class ProgressReporter:
    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / PROGRESS_FILE
        self.bar: tqdm | None = None
        self._window_started = time.perf_counter()
        self._window_steps = 0

    def start_bar(self, total_steps: int, initial_step: int) -> None:
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="steps", disable=not self.enabled,
                        file=sys.stderr, dynamic_ncols=True)
        self._window_started, self._window_steps = time.perf_counter(), 0

    def advance(self, loss: float, lr: float) -> None:
        """Once per optimizer step: tqdm shows every step; the JSON line comes from `log_step`."""
        self._window_steps += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def log_step(self, step: int, loss: float, lr: float, epoch: int, max_steps: int, **extra: Any) -> None:
        elapsed = time.perf_counter() - self._window_started
        speed = self._window_steps / elapsed if elapsed > 0 else 0.0
        self.event("step", step=step, max_steps=max_steps, epoch=epoch, loss=round(loss, 6), lr=lr,
                   steps_per_s=round(speed, 4), **extra)
        self._window_started, self._window_steps = time.perf_counter(), 0

    def event(self, name: str, **fields: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps({"event": name, **fields, "time": round(time.time(), 3)}, default=str)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(line + "\n")
        # tqdm.write keeps the bar intact below the line when both go to a terminal.
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_progress(path: Path, tail_bytes: int | None = None) -> list[dict[str, Any]]:
    """The parseable lines of a progress file, or of its last `tail_bytes` (a line cut short is skipped)."""
    try:
        with path.open("rb") as stream:
            if tail_bytes is not None:
                stream.seek(max(0, path.stat().st_size - tail_bytes))
            text = stream.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
