"""Compact archives of finished runs: what a report needs, small enough to commit beside the results.

A sweep of the paper's protocol leaves a folder per run with checkpoints, the final model and a
rounds.jsonl line per round: hundreds of megabytes that no repository should hold, and that a fresh
machine lacks. ``arcsim archive DIR FILE`` writes one gzipped JSON line per complete run of a run or
sweep folder (completed, or diverged; see arcsim/report.py), in folder-name order:

* ``run``: the folder's name; ``config_yaml``: its config.yaml; ``summary``: its summary.json;
* ``records``: the rounds.jsonl records of the rounds that evaluated (test or validation accuracy) and
  of the last round, whole; the other rounds are left out (``--all-rounds`` keeps every round).

``arcsim archive --extract FILE DIR`` writes them back as run folders (config.yaml, summary.json,
rounds.jsonl with the kept records). ``arcsim report DIR`` reads those as it reads the originals (its
accuracy tables and the selection use only evaluations; its per-round plots get the kept rounds), and
``arcsim sweep CONFIG --out DIR`` takes them as complete and runs only the rest of the grid, so a sweep
can go on on another machine from what was committed. The file is reproducible: the same runs give
the same bytes (sorted keys, no timestamp in the gzip header).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ArchiveResult", "archive_runs", "extract_runs", "kept_records"]

_FINISHED = ("completed", "diverged")


@dataclass(frozen=True)
class ArchiveResult:
    path: Path  # the archive written, or the folder extracted into
    runs: tuple[str, ...]  # the runs archived or extracted
    skipped: tuple[str, ...]  # archive: folders not complete; extract: folders that already existed


def kept_records(records: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records an archive keeps: those of the rounds that evaluated, and the last one.

    >>> kept_records([{"round": 0, "accuracy": None}, {"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": None}])
    [{'round': 1, 'accuracy': 0.5}, {'round': 2, 'accuracy': None}]
    """
    return [
        record
        for k, record in enumerate(records)
        if record.get("accuracy") is not None or record.get("validation_accuracy") is not None or k == len(records) - 1
    ]


def _run_folders(path: Path) -> list[Path]:
    if (path / "summary.json").exists():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.yaml").exists())


def _entry(run_dir: Path, *, all_rounds: bool = False) -> dict[str, Any] | None:
    """The archive line of ``run_dir``, or None when the run is not complete (or unreadable)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        config_yaml = (run_dir / "config.yaml").read_text()
        lines = (run_dir / "rounds.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        return None
    status, done = summary.get("status"), summary.get("rounds_completed")
    if status not in _FINISHED or (status == "completed" and done != summary["config"].get("rounds")):
        return None
    rounds = [r.get("round") for r in records if isinstance(r, dict)]
    if not isinstance(done, int) or not records or len(rounds) != len(records) or rounds[-1] != done - 1:
        return None  # rounds.jsonl does not end with the last round the summary says was done
    if not all(isinstance(r, int) for r in rounds) or rounds != sorted(set(rounds)):
        return None  # (an extracted archive's rounds.jsonl holds only the kept rounds: archived again as is)
    kept = records if all_rounds else kept_records(records)
    return {"run": run_dir.name, "config_yaml": config_yaml, "summary": summary, "records": kept}


def archive_runs(path: str | Path, out: str | Path, *, all_rounds: bool = False) -> ArchiveResult:
    """Archive the complete runs of the run or sweep folder ``path`` into ``out`` (gzipped JSON lines);
    ``all_rounds`` keeps every round's record (e.g. an asynchronous run's windows), not only the evaluated.

    ValueError when ``path`` is not a folder or holds no complete run. The file is written atomically.
    """
    path, out = Path(path), Path(out)
    if not path.is_dir():
        raise ValueError(f"archive: {path} is not a folder")
    entries, skipped = [], []
    for run_dir in _run_folders(path):
        entry = _entry(run_dir, all_rounds=all_rounds)
        if entry is None:
            skipped.append(run_dir.name)
        else:
            entries.append(entry)
    if not entries:
        raise ValueError(f"archive: no complete run in {path} ({len(skipped)} run folders not complete)")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as handle:
        for entry in entries:
            handle.write((json.dumps(entry, sort_keys=True) + "\n").encode())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(out)
    return ArchiveResult(out, tuple(e["run"] for e in entries), tuple(skipped))


def _read_archive(path: Path) -> Iterator[dict[str, Any]]:
    try:
        with gzip.open(path, "rt") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                entry = json.loads(line)
                if not (
                    isinstance(entry, dict)
                    and isinstance(entry.get("run"), str)
                    and isinstance(entry.get("config_yaml"), str)
                    and isinstance(entry.get("summary"), dict)
                    and isinstance(entry.get("records"), list)
                ):
                    raise ValueError(f"archive {path}: line {number} is not a run entry (run, config_yaml, ...)")
                yield entry
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise ValueError(f"archive {path}: cannot read it as gzipped JSON lines ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"archive {path}: not JSON lines ({error})") from None


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def extract_runs(archive: str | Path, out: str | Path) -> ArchiveResult:
    """Write the runs of ``archive`` as run folders under ``out``; a folder that exists is left as it is.

    ValueError for a file that is not an archive, or a run name that is not a plain folder name.
    """
    archive, out = Path(archive), Path(out)
    entries = list(_read_archive(archive))
    bad = [entry["run"] for entry in entries if not _safe_name(entry["run"])]
    if bad:
        raise ValueError(f"archive {archive}: run names that are not plain folder names: {bad[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    written, existing = [], []
    for entry in entries:
        run_dir = out / entry["run"]
        if run_dir.exists():
            existing.append(entry["run"])
            continue
        tmp = out / f".{entry['run']}.tmp"
        tmp.mkdir()
        (tmp / "config.yaml").write_text(entry["config_yaml"])
        (tmp / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in entry["records"]))
        (tmp / "summary.json").write_text(json.dumps(entry["summary"], indent=2) + "\n")
        tmp.replace(run_dir)  # a folder appears whole or not at all
        written.append(entry["run"])
    return ArchiveResult(out, tuple(written), tuple(existing))
