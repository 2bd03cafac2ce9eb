"""A one-line live progress display for runs (stderr), and the end-of-run summary."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """The progress line of one process's rounds.

    ``rounds_before``: rounds completed before this process started (a resumed run); the rate counts
    only the rounds done since, over the time since the display was made. None: taken from the first
    record shown (its round index), right when records arrive only from rounds this process runs; a
    display that first replays earlier records (the grpc launcher reading rounds.jsonl) passes it.
    """

    def __init__(
        self, total_rounds: int, *, stream: TextIO | None = None, label: str = "", rounds_before: int | None = None
    ) -> None:
        if rounds_before is not None and rounds_before < 0:
            raise ValueError(f"rounds_before must be >= 0, got {rounds_before}")
        self.total = total_rounds
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.accuracy: float | None = None
        self.rounds_before = rounds_before
        self.started = time.monotonic()
        self.tty = self.stream.isatty()
        self._last_print = 0.0

    def update(self, record: dict[str, Any]) -> None:
        if record.get("accuracy") is not None:
            self.accuracy = record["accuracy"]
        if self.rounds_before is None:
            self.rounds_before = record["round"]
        done = record["round"] + 1
        now = time.monotonic()
        # On a terminal redraw the line; in a log print at most one line every 5 s (and the last).
        if not self.tty and now - self._last_print < 5 and done < self.total:
            return
        self._last_print = now
        width = 24
        filled = int(width * done / self.total)
        bar = "#" * filled + "." * (width - filled)
        accuracy = "  -  " if self.accuracy is None else f"{100 * self.accuracy:5.1f}%"
        threshold = record.get("clip_threshold")
        clip = "-" if threshold is None else f"{threshold:.3g}"
        # Only the rounds this process ran, over its own time: after --resume, the rounds done
        # before would otherwise inflate the rate (they took no time here).
        elapsed = now - self.started
        ran = done - self.rounds_before
        rate = f"{ran / elapsed:.2f}" if ran > 0 and elapsed > 0 else "-"
        honest, byzantine = record.get("clipped_honest", 0), record.get("clipped_byzantine", 0)
        # None: the clipping stage saw mixtures of rows (after NNM), so only a row count is known.
        clipped = (
            f"clipped h/b {honest}/{byzantine}"
            if honest is not None
            else f"clipped rows {record.get('clipped_rows', 0)}"
        )
        line = (
            f"{self.label}[{bar}] round {done}/{self.total}  acc {accuracy}  clip C {clip}  {clipped}  {rate} rounds/s"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def format_summary(summary: dict[str, Any], out_dir: str) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    config = summary["config"]
    return "\n".join(
        [
            f"run {summary['status']}: {summary['rounds_completed']} rounds in {summary['wall_seconds']:.1f}s "
            f"({summary['engine']} engine)",
            f"  {config['num_honest']} honest + {config['num_byzantine']} Byzantine ({config['attack']}), "
            f"pipeline '{config['pipeline']}', {config['task']} / {config['model']}, {config['partitioner']}",
            f"  final accuracy {pct(summary['final_accuracy'])}, max accuracy {pct(summary['max_accuracy'])}",
            f"  final_params_sha256 {summary['final_params_sha256']}",
            f"  results in {out_dir} (summary.json, rounds.jsonl)",
        ]
    )
