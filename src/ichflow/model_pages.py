"""What the MLflow UI shows on a page: Markdown for a registered model and its versions (written at each
promotion) and for a training run (its description, the ``mlflow.note.content`` tag)."""

from __future__ import annotations

from pathlib import Path

from ichflow.data import windows

# aliases in backticks: the UI's Markdown would link a bare "@champion" to a GitHub user
VERDICTS = {"promoted": "PROMOTED to `@champion`", "rejected": "not promoted (kept as `@challenger`)",
            "below_floor": "not promoted: below the quality floor (no alias)",
            "degenerate": "not promoted: degenerate model (no alias)"}


def _num(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def _ci(metrics: dict, key: str) -> str:
    lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""


def _rule_text(rule: dict) -> str:
    guards = ", ".join(f"{k} may drop ≤ {v:g}" for k, v in rule["guards"].items()) or "none"
    floors = ", ".join(f"{k} ≥ {v:g}" for k, v in rule["floor"].items()) or "none"
    return (f"`{Path(rule.get('source', '')).name or 'rule'}`: primary **{rule['primary']}** must improve by "
            f"≥ {rule['margin']:g}; guards: {guards}; floors: {floors}")


def comparison_table(decision) -> list[str]:
    champ = f"champion v{decision.champion_version}" if decision.champion_version else "champion"
    rows = ["| metric | candidate | 95 % CI | " + champ + " | delta |", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys([decision.rule["primary"], *decision.rule["guards"], *decision.rule["floor"]]))
    for key in keys:
        cand = decision.candidate_metrics.get(key)
        champion = decision.champion_metrics.get(key)
        delta = decision.deltas.get(key)
        rows.append(f"| {key} | {_num(cand)} | {_ci(decision.candidate_metrics, key)} | "
                    f"{_num(champion) if decision.champion_metrics else '—'} | "
                    f"{'' if delta is None else f'{delta:+.4f}'} |")
    return rows


def input_line(meta: dict) -> str:
    """What the model takes, with the HU window its 8-bit slices were made with (its metadata ``window``)."""
    return (f"Input: the 8-bit axial slices of one scan windowed with {windows.from_metadata(meta)}; "
            "`predict` applies this window itself to DICOM series and NIfTI volumes in HU.")


def version_description(decision, meta: dict | None = None) -> str:
    """The version page: the decision first, then why, on what, the test split for information, and the input
    the model expects (``meta``: its MLmodel metadata)."""
    lines = [f"**Decision: {VERDICTS.get(decision.decision, decision.decision)}** — {decision.reason}", "",
             f"Rule {_rule_text(decision.rule)}.", ""]
    lines += comparison_table(decision)
    if decision.compared_on:
        lines += ["", f"Compared on: {decision.compared_on}."]
    report = [k for k in decision.rule["report"] if k in decision.report_metrics]
    if report:
        lines += ["", "Test split (reported, never decides): " + ", ".join(
            f"{k} {_num(decision.report_metrics[k])} {_ci(decision.report_metrics, k)}".rstrip() for k in report)]
    lines += ["", f"Data: split digest `{decision.split_digest or 'unknown'}`; training run "
                  f"`{decision.candidate_run_id}`; decided {decision.time}."]
    if meta is not None:
        lines += ["", input_line(meta)]
    return "\n".join(lines)


def model_description(spec, champion, headline: dict, rule: dict) -> str:
    """The registered model's page: what it does, its input and output, and the current champion."""
    lines = [spec.summary, "", f"Task `{spec.name}` (target: {spec.target}); promotion rule: {_rule_text(rule)}."]
    if champion is None:
        lines += ["", "**No `@champion` yet**: no version has passed the quality gate."]
    else:
        shown = ", ".join(f"{k} {_num(v)} {_ci(headline, k)}".rstrip() for k, v in headline.items()
                          if not k.endswith(("_ci_low", "_ci_high")))
        lines += ["", f"**`@champion`: version {champion.version}** — {shown}."]
    return "\n".join(lines)


def value_text(metrics: dict, key: str) -> str:
    """``0.512 [0.401, 0.598]`` (with the CI when one is logged), ``n/a`` for NaN, ``—`` when absent."""
    value = metrics.get(key)
    if not isinstance(value, (int, float)):
        return "—"
    if value != value:
        return "n/a"
    lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    ci = f" [{lo:.3f}, {hi:.3f}]" if isinstance(lo, float) and isinstance(hi, float) and lo == lo and hi == hi else ""
    return f"{value:.3f}{ci}"


def headline_table(names, metrics: dict) -> list[str]:
    """One row per headline metric, one column per split that logged any (val, test)."""
    splits = [s for s in ("val", "test") if any(f"{s}_{n}" in metrics for n in names)]
    if not splits:
        return ["No headline metric was logged."]
    rows = ["| metric | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    rows += [f"| {n} | " + " | ".join(value_text(metrics, f"{s}_{n}") for s in splits) + " |"
             for n in names if any(f"{s}_{n}" in metrics for s in splits)]
    return rows


def headline_line(task: str, name: str, metrics: dict) -> str:
    """The first line of a run page, readable while the UI keeps the rest of the description folded:
    ``**segmentation** — test dice 0.931 [0.907, 0.955] · val dice 0.952 [0.944, 0.959]``."""
    shown = [f"{s} {name} {value_text(metrics, f'{s}_{name}')}" for s in ("test", "val") if f"{s}_{name}" in metrics]
    return f"**{task}** — " + (" · ".join(shown) or f"no {name} logged")


def data_line(prep) -> str:
    sizes = prep.split["split"].value_counts()
    patients = " · ".join(f"{k} {int(sizes.get(k, 0))}" for k in ("train", "val", "test"))
    return (f"Data: reader `{prep.dataset}` ({prep.source}) at `{prep.data_root}`; patients {patients}; "
            f"split digest `{prep.split_digest}`.")


def run_description(spec, metrics: dict, prep, model_version: int | None) -> str:
    """A training run's page: what it predicts, its headline numbers on val and test (95 % CI where logged),
    the data it saw and the registered model version."""
    what = spec.summary.split(". ")[0].rstrip(".")
    lines = [headline_line(spec.name, spec.headline[0], metrics), "", f"Target `{spec.target}`: {what}.", ""]
    lines += headline_table(spec.headline, metrics)
    if spec.cross_validated:
        lines += ["", "Cross-validated: val = mean of the folds' inner validation, test = the held-out folds."]
    lines += ["", data_line(prep), ""]
    if model_version is None:
        lines.append("Model: not registered.")
    else:
        lines.append(f"Model: `{spec.registered_name}` version {model_version} "
                     f"(`models:/{spec.registered_name}/{model_version}`).")
    return "\n".join(lines)
