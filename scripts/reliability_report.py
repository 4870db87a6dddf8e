"""Run the bad-input table of tests/test_user_errors.py as real processes and count what a user sees.

    .venv/bin/python scripts/reliability_report.py            # every case (several minutes on 2 cores)
    .venv/bin/python scripts/reliability_report.py --every 3  # every 3rd case: a cheap subset

Each case runs ``python pipelines/<entry>.py ...`` in a fresh process against its own empty tracking store and
work folder. Outcome per case: ``clear`` (exit 2, exactly one ``error:`` line, no traceback), ``traceback``,
``silent`` (exit 0: the bad input was accepted), ``lost`` (killed, another exit code, or a run left RUNNING).
Writes reports/reliability.json and reports/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import test_user_errors as table  # noqa: E402  (the cases live with their test)


def cases() -> list[tuple[str, str, list[str], object]]:
    out = [("parameter", entry, argv, None) for entry, argv, _ in table.CASES]
    for case in table.DATA_CASES:
        entry, argv, make = case.values if hasattr(case, "values") else case
        out.append(("data folder", entry, argv, make))
    return out


def running_runs(db: Path) -> int:
    import sqlite3

    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]


def run_case(kind: str, entry: str, argv: list[str], make, timeout_s: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ichflow-reliability-") as tmp:
        base = Path(tmp)
        args = list(argv)
        label = " ".join(argv)
        if make is not None:
            try:
                folder = make(base)
            except BaseException as exc:  # e.g. pytest.skip for a case that needs a non-root user
                return {"kind": kind, "entry": entry, "case": make.__name__[1:], "outcome": "skipped",
                        "detail": str(exc)[:200]}
            flag = "--input" if entry == "predict" else "--data_dir"
            args = [flag, str(folder), *argv]
            label = f"{make.__name__[1:]} {' '.join(argv)}".strip()
        env = {**os.environ, "ICHFLOW_WORK_DIR": str(base / "work"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}"}
        env.pop("ICHFLOW_DATA_DIR", None)
        t0 = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, f"pipelines/{entry}.py", *args], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=timeout_s)
            code, err = done.returncode, done.stderr
        except subprocess.TimeoutExpired as exc:
            code, err = None, (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        seconds = time.perf_counter() - t0
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        left_running = running_runs(base / "mlflow.db")
        if code == 2 and len(lines) == 1 and "Traceback" not in err and not left_running:
            outcome = "clear"
        elif "Traceback" in err:
            outcome = "traceback"
        elif code == 0:
            outcome = "silent"
        else:
            outcome = "lost"
        return {"kind": kind, "entry": entry, "case": label, "outcome": outcome, "exit": code,
                "runs_left_running": left_running, "seconds": round(seconds, 1),
                "error_line": lines[-1][:300] if lines else (err.strip().splitlines() or [""])[-1][:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=1, help="run every n-th case (1 = all)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per case")
    args = parser.parse_args()
    chosen = cases()[::max(1, args.every)]
    results = []
    for i, (kind, entry, argv, make) in enumerate(chosen, 1):
        res = run_case(kind, entry, argv, make, args.timeout)
        results.append(res)
        print(f"[{i}/{len(chosen)}] {res['outcome']:9} {entry} {res['case']}: {res.get('error_line', '')[:120]}",
              flush=True)
    tried = [r for r in results if r["outcome"] != "skipped"]
    counts = {k: sum(r["outcome"] == k for r in tried) for k in ("clear", "traceback", "silent", "lost")}
    summary = {"tried": len(tried), **counts, "skipped": len(results) - len(tried),
               "table_size": len(cases()), "every": args.every,
               "command": f"python scripts/reliability_report.py --every {args.every}"}
    out = REPO / "reports"
    (out / "reliability.json").write_text(json.dumps({"summary": summary, "cases": results}, indent=2) + "\n")
    rows = "\n".join(f"| {r['kind']} | {r['entry']} | `{r['case']}` | {r['outcome']} | "
                     f"{r.get('error_line', r.get('detail', '')).replace('|', '/')[:160]} |" for r in results)
    (out / "reliability.md").write_text(f"""# Reliability: bad parameters and bad data folders, as a user meets them

Generated by `{summary['command']}` (every case of the table in `tests/test_user_errors.py` run as its own
process, `python pipelines/<entry>.py ...`, against an empty tracking store and work folder; `--every 1` runs
all {summary['table_size']} cases). The same table runs in-process in `pytest tests/test_user_errors.py`.

| tried | clear (exit 2, one line) | traceback | silent (exit 0) | lost (killed / other / run left RUNNING) | skipped |
|---|---|---|---|---|---|
| {summary['tried']} | {counts['clear']} | {counts['traceback']} | {counts['silent']} | {counts['lost']} | {summary['skipped']} |

Store faults and model integrity are covered by `tests/test_store_faults.py` and `tests/test_integrity.py`.

| kind | entry | case | outcome | what the user saw (last line) |
|---|---|---|---|---|
{rows}
""")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
