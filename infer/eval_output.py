"""The ``zaya eval`` run directory: settings, per-problem results, summary files and the plot.

DIR/run.json        the settings the run was started with (``--resume`` refuses other settings)
DIR/results.jsonl   one record per problem, appended and flushed as each problem finishes
DIR/summary.json    the scores (deterministic: sorted keys, no timings)
DIR/summary.md      the table, with timings
DIR/accuracy.png    accuracy against tokens generated, one point per round (needs matplotlib)

Summary files and the plot are written to a temporary name (``summary.tmp.json``) and renamed; files of
other names in DIR are never touched, and none of these may be an input of the run.
"""

from __future__ import annotations

import json
import os
import sys

from zaya_jax.outputs import OutputLock, check_outputs

RUN, RESULTS, SUMMARY_JSON, SUMMARY_MD, PLOT = "run.json", "results.jsonl", "summary.json", "summary.md", "accuracy.png"
OWN_FILES = (RUN, RESULTS, SUMMARY_JSON, SUMMARY_MD, PLOT)


class RunDir:
    """An output directory opened for a run with ``settings``: fresh, resumed or (``force``) restarted.
    ``inputs`` (a name -> a path) are refused as any file the run writes."""

    def __init__(self, path: str, settings: dict, *, resume: bool = False, force: bool = False,
                 inputs: dict[str, str] | None = None):
        self.path, self.settings = path, json.loads(json.dumps(settings))  # as run.json will read back
        written = [self._file(name) for name in OWN_FILES] + [_temporary(self._file(name)) for name in OWN_FILES]
        check_outputs({f"--out's {os.path.basename(file)}": file for file in written}, inputs or {})
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"--out {path} exists and is not a directory")
        os.makedirs(path, exist_ok=True)
        self._lock = OutputLock(path, "--out")  # held until close: one run per directory
        try:
            self._open(settings, resume, force)
        except BaseException:
            self._lock.close()
            raise

    def _open(self, settings: dict, resume: bool, force: bool) -> None:
        entries = os.listdir(self.path)
        self.records: dict[int, dict] = {}
        if resume and entries:
            self._check_settings()
            self.records = self._read_results()
        elif entries and not force:
            raise ValueError(f"--out {self.path} is not empty: pass --resume to continue the run in it, or --force "
                             f"to start over (only {', '.join(OWN_FILES)} are replaced)")
        else:
            for name in OWN_FILES:
                if os.path.exists(self._file(name)):
                    os.remove(self._file(name))
            self._write_atomic(RUN, json.dumps(settings, indent=1, sort_keys=True) + "\n")
        self._results = open(self._file(RESULTS), "a", encoding="utf-8")

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _check_settings(self) -> None:
        if not os.path.isfile(self._file(RUN)):
            raise ValueError(f"--resume: {self.path} has no {RUN}, so it is not a `zaya eval` run directory")
        with open(self._file(RUN), encoding="utf-8") as f:
            try:
                before = json.load(f)
            except ValueError as e:
                raise ValueError(f"--resume: {self._file(RUN)} is not valid JSON ({e}); it was not written by "
                                 "`zaya eval`") from None
        if not isinstance(before, dict):
            raise ValueError(f"--resume: {self._file(RUN)} is not a settings object of `zaya eval`")
        differ = [k for k in sorted(set(before) | set(self.settings)) if before.get(k) != self.settings.get(k)]
        if differ:
            said = "; ".join(f"{k}: {before.get(k)!r} there, {self.settings.get(k)!r} now" for k in differ)
            raise ValueError(f"--resume: {self.path} was run with other settings ({said}); use another --out, "
                             f"or --force to start over")

    def _read_results(self) -> dict[int, dict]:
        """The finished problems' records by index; a line cut short by a kill is dropped from the file."""
        file = self._file(RESULTS)
        if not os.path.isfile(file):
            return {}
        with open(file, "rb") as f:
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a last line without its newline was being written
        if len(complete) < len(data):
            with open(file, "r+b") as f:
                f.truncate(len(complete))
        records = {}
        for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{number}: not valid JSON ({e}); it was not written by `zaya eval`") from e
            if not _is_record(record):
                raise ValueError(f"{file}:{number}: not a problem record of `zaya eval` (an object with an integer "
                                 "\"index\" and \"rounds\", each with its \"correct\" list)")
            if record["index"] in records:
                raise ValueError(f"{file}:{number}: a second record of problem {record['index']} (two runs wrote the "
                                 "directory at once); not resuming: use another --out, or --force to start over")
            records[record["index"]] = record
        return records

    def append(self, record: dict) -> None:
        """Adds one finished problem's record (a whole line, flushed: a kill loses at most that line)."""
        self._results.write(json.dumps(record) + "\n")
        self._results.flush()
        self.records[record["index"]] = record

    def write_summary(self, summary: dict, table: str) -> None:
        self._results.close()
        self._write_atomic(SUMMARY_JSON, json.dumps(summary, indent=1, sort_keys=True) + "\n")
        self._write_atomic(SUMMARY_MD, table + "\n")
        plot_accuracy(summary, self._file(PLOT))

    def close(self) -> None:
        """Ends the run's hold on the directory (its lock); call once it is written or the run failed."""
        self._results.close()
        self._lock.close()

    def _write_atomic(self, name: str, text: str) -> None:
        tmp = _temporary(self._file(name))
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self._file(name))


def _temporary(file: str) -> str:
    """The temporary name ``file`` is written under before its rename: ``summary.tmp.json``."""
    stem, ext = os.path.splitext(file)
    return stem + ".tmp" + ext


def _is_record(record) -> bool:
    """Whether ``record`` has the shape ``score_problem`` writes, as far as a resumed run reads it."""
    return (isinstance(record, dict) and type(record.get("index")) is int and isinstance(record.get("rounds"), list)
            and all(isinstance(r, dict) and isinstance(r.get("correct"), list) for r in record["rounds"]))


def plot_accuracy(summary: dict, path: str) -> bool:
    """Accuracy against generated tokens per problem, one point per round (the majority vote dashed).
    Returns False, saying so, when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"{os.path.basename(path)} skipped: matplotlib is not installed (pip install -e \".[plot]\")",
              file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds, s = summary["rounds"], summary["settings"]
    tokens = [r["tokens_so_far"] / summary["problems"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(tokens, [r["mean_accuracy"] for r in rounds], "o-", label="mean accuracy of round-t members")
    ax.plot(tokens, [r["majority_accuracy"] for r in rounds], "s--", label="majority vote of round-t members")
    for r, x in zip(rounds, tokens):
        ax.annotate(f"t={r['round']}", (x, r["mean_accuracy"]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlabel(f"generated tokens per problem ({summary['problems']} problems)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Markov RSA: N={s['population']}, C={s['tails']}, budget {s['budget']}, tau={s['tail_tokens']}, "
                 f"temperature {s['temperature']}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(_temporary(path))
    plt.close(fig)
    os.replace(_temporary(path), path)
    return True
