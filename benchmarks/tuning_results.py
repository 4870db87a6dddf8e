"""Section 3: pruning savings and worker scaling, read from the tuning benchmark's results file.

``reports/tuning_synthetic.json`` is written by the tuning run (Optuna studies with and without pruning, 1
and 2 worker processes); nothing is estimated here. When the file is missing the section says so.
"""

from __future__ import annotations

import json
import re

from benchmarks.core import REPO, ratio

SOURCE = REPO / "reports" / "tuning_synthetic.json"
INTERESTING = ("saved", "per_hour", "speedup", "worker", "pruned", "best_value", "objective", "epochs_run",
               "wall", "scaling", "ratio")


def flatten(obj, prefix: str = "") -> dict:
    """{'a.b.0.c': leaf} for every number/string leaf of a JSON document."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


def _workers_in(path: str) -> int | None:
    m = re.search(r"(?:workers?|n_workers)[_=\-.]?(\d+)|(\d+)[_\-]?workers?", path)
    if not m:
        return None
    return int(m.group(1) or m.group(2))


def summarise(doc: dict) -> dict:
    flat = {k: v for k, v in flatten(doc).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    figures = {k: v for k, v in flat.items() if any(w in k.lower() for w in INTERESTING)}
    headline = {k: v for k, v in figures.items()
                if ("saved" in k.lower() or "speedup" in k.lower() or re.search(r"2.*÷.*1|ratio", k.lower()))}
    if not any("speedup" in k.lower() or "ratio" in k.lower() for k in headline):
        per_hour = {k: v for k, v in flat.items() if "trials_per_hour" in k}
        by_workers = {}
        for k, v in per_hour.items():
            w = _workers_in(k)
            if w is not None:
                by_workers.setdefault(w, (k, v))
        if 1 in by_workers and 2 in by_workers:
            (k1, v1), (k2, v2) = by_workers[1], by_workers[2]
            headline[f"trials/hour 2 workers ÷ 1 worker (from {k2} ÷ {k1})"] = ratio(v2, v1)
    return {"figures": figures, "headline": headline}


def summarise_studies(doc: dict) -> dict:
    """The layout of ``benchmarks/tuning_studies.py``: ``studies`` (pruned studies), ``scaling`` (1 vs 2 workers)."""
    figures, headline = {}, {}
    for st in doc.get("studies", []):
        task = st.get("task", "?")
        saved, run_ = st.get("trial_epochs_saved_by_pruning"), st.get("trial_epochs_run")
        figures[f"{task}: trials (complete / pruned / failed)"] = (
            f"{st.get('trials_new')} ({st.get('trials_complete')} / {st.get('trials_pruned')} / {st.get('trials_failed')})")
        figures[f"{task}: trial-epochs run / saved by pruning"] = f"{run_} / {saved}"
        figures[f"{task}: best value ({st.get('pruner')} pruner)"] = st.get("best_value")
        figures[f"{task}: study wall s"] = st.get("study_wall_seconds")
        headline[f"pruning: share of trial-epochs saved, {task}"] = st.get("trial_epochs_saved_fraction")
    per_hour = {}
    for st in doc.get("scaling", []):
        per_hour[st.get("n_workers")] = st.get("trials_per_hour")
        figures[f"worker scaling: trials/hour with {st.get('n_workers')} worker(s) ({st.get('task')}, pruner "
                f"{st.get('pruner')})"] = st.get("trials_per_hour")
    if "scaling_ratio" in doc:
        headline["trials/hour 2 workers ÷ 1 worker"] = doc["scaling_ratio"]
    elif 1 in per_hour and 2 in per_hour:
        headline["trials/hour 2 workers ÷ 1 worker"] = ratio(per_hour[2], per_hour[1])
    m = doc.get("machine", {})
    date, commit = m.get("date_utc", m.get("date", "n/a")), m.get("git_commit", m.get("commit", "n/a"))  # or older keys
    figures["measured (tuning file)"] = f"{date}, commit {commit}" + (", QUICK mode" if doc.get("quick") else "")
    return {"figures": {**figures, **{k: v for k, v in headline.items()}}, "headline": headline}


def run() -> dict:
    if not SOURCE.exists():
        return {"found": False, "source": str(SOURCE.relative_to(REPO)),
                "note": f"{SOURCE.relative_to(REPO)} does not exist yet (it is written by the tuning benchmark); "
                        "no pruning or worker-scaling figure is reported"}
    doc = json.loads(SOURCE.read_text())
    body = summarise_studies(doc) if "studies" in doc or "scaling" in doc else summarise(doc)
    return {"found": True, "source": str(SOURCE.relative_to(REPO)), **body}
