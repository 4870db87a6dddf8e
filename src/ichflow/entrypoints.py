"""The entry points by name: what ``pipelines/<entry>.py`` (``mlflow run -e <entry>``) and ``ichflow <entry>`` run.

Config classes and run functions are named, not imported: the config's module is light (no torch, mlflow),
and the run function's module is imported only after the command line parsed, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from ichflow.cli import OneLineParser, load, main_guard
from ichflow.tasks.spec import TASKS


@dataclass(frozen=True)
class EntryPoint:
    name: str
    summary: str     # one line for ``ichflow --help`` and the top of ``ichflow <entry> --help``
    config: str      # "module:Class" of its parameters, in a module that imports nothing heavy
    run: str         # "module:function" taking the config

    def config_class(self):
        return load(self.config)


def _task(name: str, summary: str) -> EntryPoint:
    spec = TASKS[name]
    return EntryPoint(name, summary, f"{spec.package}:{spec.config_name}", f"{spec.package}:{spec.train_name}")


ENTRY_POINTS: dict[str, EntryPoint] = {e.name: e for e in (
    EntryPoint("main", "the whole pipeline on one data folder (default: the synthetic phantom)",
               "ichflow.configs:PipelineConfig", "ichflow.pipeline:run_pipeline"),
    EntryPoint("prepare", "manifest + validation report + patient-level split, logged to MLflow",
               "ichflow.configs:DataConfig", "ichflow.prepare:run_prepare"),
    _task("segmentation", "PHE (edema) segmentation, trained, evaluated and registered"),
    _task("classification", "bleed / no-bleed slice classifier (timm CNN), trained, evaluated and registered"),
    _task("detection", "lesion boxes with YOLOv8 or Faster R-CNN, trained, evaluated and registered"),
    _task("multilabel", "IVH / IPH / SAH subtype classifier, patient-level k-fold cross-validation"),
    EntryPoint("tune", "an Optuna study over one task, trials as child runs",
               "ichflow.configs:TuneConfig", "ichflow.tuning:run_tune"),
    EntryPoint("promote", "compare a candidate with @champion and move the aliases",
               "ichflow.configs:PromoteConfig", "ichflow.registry:run_promote"),
    EntryPoint("history", "print the promotion log of a registered model",
               "ichflow.configs:HistoryConfig", "ichflow.registry:run_history"),
    EntryPoint("evaluate", "a registered model on a labelled data folder: the task's metrics and figures",
               "ichflow.configs:EvaluateConfig", "ichflow.evaluation:run_evaluate"),
    EntryPoint("predict", "masks / boxes / overlays and a CSV of slice scores from a registered model",
               "ichflow.configs:PredictConfig", "ichflow.serving:run_predict"),
)}


def run_entry_point(name: str, argv=None, prog: str | None = None):
    """Parse ``argv`` into the entry point's config and run it (``main_guard``: one-line errors, signals)."""
    entry = ENTRY_POINTS[name]
    description = f"{entry.summary[:1].upper()}{entry.summary[1:]}."
    return main_guard(entry.run, entry.config_class(), argv, description=description, prog=prog)


def _listing() -> str:
    width = max(map(len, ENTRY_POINTS))
    lines = [f"  {e.name:<{width}}  {e.summary}" for e in ENTRY_POINTS.values()]
    return "entry points (the same as `mlflow run . -e <entry>`):\n" + "\n".join(lines) + \
        "\n\n`ichflow <entry> --help` lists the entry point's parameters."


def main(argv=None) -> None:
    """``ichflow <entry> [--name value ...]``: the console script."""
    parser = OneLineParser(prog="ichflow", description="Head-CT hemorrhage models: train, tune, promote, predict.",
                           epilog=_listing(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry", choices=ENTRY_POINTS, metavar="<entry>", help="one of the entry points below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its parameters: --name value ...")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:   # argparse would name the trailing parameters as missing, which they are not
        parser.print_help(sys.stderr)
        sys.exit(2)
    args = parser.parse_args(argv)
    run_entry_point(args.entry, args.args, prog=f"ichflow {args.entry}")
