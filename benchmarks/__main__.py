"""``python -m benchmarks run [--quick] [--only NAME] [--model task=URI ...]``: the CPU benchmark suite.

Writes ``reports/BENCHMARKS.md`` and ``reports/benchmarks.json``. Every section runs in its own process
(``python -m benchmarks section NAME``) against a fresh MLflow store under ``work/benchmarks/``; see
``benchmarks/runner.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the suite (or one section) and write the report")
    run.add_argument("--quick", action="store_true", help="smallest sizes, fewest repeats (a few minutes)")
    run.add_argument("--only", default="", help="pipeline | pipeline:<task> | tracking | tuning | inference | "
                                                "scaling (comma-separated); the other sections of an existing "
                                                "reports/benchmarks.json are kept")
    run.add_argument("--model", action="append", default=[], metavar="TASK=URI",
                     help="inference: use this model (e.g. segmentation=models:/ich-segmentation@champion) "
                          "instead of the one trained by the pipeline section / a tiny one")
    run.add_argument("--reports", default="reports", help="folder for BENCHMARKS.md and benchmarks.json")
    render = sub.add_parser("render", help="re-render BENCHMARKS.md from benchmarks.json")
    render.add_argument("--reports", default="reports")
    sec = sub.add_parser("section", help=argparse.SUPPRESS)
    sec.add_argument("name")
    sec.add_argument("--task", default="")
    sec.add_argument("--quick", action="store_true")
    sec.add_argument("--out", required=True)
    sec.add_argument("--models", default="{}")
    args = parser.parse_args(argv)

    if args.cmd == "section":
        from benchmarks.sections import run_section

        result = run_section(args.name, args.task, args.quick, json.loads(args.models))
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        return 0
    if args.cmd == "render":
        from benchmarks.core import render_report

        folder = Path(args.reports)
        results = json.loads((folder / "benchmarks.json").read_text())
        (folder / "BENCHMARKS.md").write_text(render_report(results))
        return 0
    from benchmarks.runner import run_suite

    models = {}
    for item in args.model:
        task, _, uri = item.partition("=")
        if not uri:
            parser.error(f"--model expects TASK=URI, got {item!r}")
        models[task.strip()] = uri.strip()
    return run_suite(quick=args.quick, only=args.only, models=models, reports=Path(args.reports))


if __name__ == "__main__":
    sys.exit(main())
