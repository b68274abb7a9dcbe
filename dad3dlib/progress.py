"""Live progress of a study: each training writes ``progress.json`` in its run directory (steps
done of total, current loss; :class:`dad3dlib.train.ProgressFile`), and the study runner shows it
(:class:`StudyProgress`): in a terminal, one bar per active run under a study bar whose ETA counts
the active runs' fractions; in a log (not a terminal), one line per active run every
``log_every_s`` seconds. Nothing here imports Lightning.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .files import write_json

PROGRESS_FILE = "progress.json"


def write_progress(run_dir: str | Path, step: int, total: int, loss: float | None, started: float,
                   start_step: int = 0) -> None:
    """``run_dir/progress.json``: {"step", "total", "loss", "elapsed_s", "eta_s", "updated"} (atomic).
    ``started``: when this process began training, at step ``start_step`` (a resumed run's pace is
    measured from there)."""
    now = time.time()
    elapsed = now - started
    done = step - start_step
    eta = elapsed / done * max(total - step, 0) if done > 0 and total > 0 else None
    write_json(Path(run_dir) / PROGRESS_FILE, {"step": int(step), "total": int(total), "loss": loss,
                                               "elapsed_s": round(elapsed, 1), "eta_s": eta and round(eta, 1),
                                               "updated": now})


def read_progress(run_dir: str | Path) -> dict | None:
    """A run's progress record, or None when there is none yet (or it is being replaced)."""
    try:
        record = json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("total") else None


def format_duration(seconds: float | None) -> str:
    """``95`` → ``"1m35s"``; None → ``"?"``."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _loss_text(record: dict) -> str:
    return f"loss {record['loss']:.4g}" if isinstance(record.get("loss"), (int, float)) else ""


def describe(name: str, record: dict | None) -> str:
    """One line for a run: ``baseline_s1: step 300/837 (36%), loss 1.234, ETA 4m10s``."""
    if record is None:
        return f"{name}: starting"
    step, total = record["step"], record["total"]
    if step >= total:
        return f"{name}: trained ({total} steps), evaluating"
    loss = f", {_loss_text(record)}" if _loss_text(record) else ""
    return f"{name}: step {step}/{total} ({100 * step / total:.0f}%){loss}, ETA {format_duration(record.get('eta_s'))}"


class StudyProgress:
    """The study's progress display. ``update(active)`` with {run name: run dir} of the runs being
    executed, ``finished(result)`` once a run ends (an execute_run result), ``close()`` at the end.

    ``total``: runs in the study; ``done``: already finished ones; ``stream``: where to write
    (stderr); ``tty``: bars (True) or log lines (False), detected from ``stream`` by default."""

    def __init__(self, desc: str, total: int, done: int = 0, stream=None, tty: bool | None = None,
                 log_every_s: float = 60.0):
        from tqdm.auto import tqdm

        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total, self.done, self.log_every_s = total, done, log_every_s
        self.started, self._logged, self._bars, self._lines = time.time(), {}, {}, {}
        self._tqdm = tqdm
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="run", file=self.stream, disable=not self.tty,
                        bar_format="{l_bar}{bar}| {n:.2f}/{total} runs [{elapsed}<{remaining}]{postfix}")
        self._start_n = done
        if not self.tty:
            print(f"{desc}: {total} runs, {done} already finished", file=self.stream, flush=True)

    def update(self, active: dict[str, Path]) -> None:
        records = {name: read_progress(d) for name, d in active.items()}
        fraction = sum(min(r["step"] / r["total"], 1.0) for r in records.values() if r)
        if self.tty:
            self.bar.n = self.done + fraction
            self.bar.refresh()
            for name in list(self._bars):
                if name not in active:
                    self._close_bar(name)
            for name, r in records.items():
                bar = self._bars.get(name)
                if bar is None:  # the lowest line no other run's bar holds (finished ones free theirs)
                    line = min(set(range(1, len(self._bars) + 2)) - set(self._lines.values()))
                    bar = self._bars[name] = self._tqdm(total=1, desc=name, position=line, leave=False,
                                                        file=self.stream, unit="step")
                    self._lines[name] = line
                if r:
                    bar.total, bar.n = r["total"], r["step"]
                    bar.set_postfix_str(_loss_text(r), refresh=False)
                    bar.refresh()
            return
        now = time.time()
        for name, r in records.items():
            if name not in self._logged or now - self._logged[name] >= self.log_every_s:
                self._logged[name] = now
                print(f"  {describe(name, r)}; study {self.eta_line(fraction)}", file=self.stream, flush=True)

    def _close_bar(self, name: str) -> None:
        if name in self._bars:
            self._bars.pop(name).close()
            del self._lines[name]

    def eta_line(self, fraction: float = 0.0) -> str:
        """``3.4/12 runs, ETA 41m``: runs done (fractions of the active ones included) and the time
        left at this invocation's pace."""
        progressed = self.done - self._start_n + fraction
        elapsed = time.time() - self.started
        left = self.total - self.done - fraction
        eta = elapsed / progressed * left if progressed > 0 and elapsed > 0 else None
        return f"{self.done + fraction:.1f}/{self.total} runs, ETA {format_duration(eta)}"

    def finished(self, result: dict) -> None:
        if result["status"] != "interrupted":
            self.done += 1
        self._close_bar(result["run"])
        if self.tty:
            self.bar.n = self.done
            self.bar.set_postfix_str(f"{result['run']}: {result['status']}")
        else:
            print(f"{result['run']}: {result['status']} ({self.done}/{self.total} runs)", file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self.bar.close()
