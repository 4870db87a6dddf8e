"""What the MLflow UI shows on a registered model and its versions: Markdown written at each promotion."""

from __future__ import annotations

from pathlib import Path

from ichflow.data import windows

VERDICTS = {"promoted": "PROMOTED to @champion", "rejected": "not promoted (kept as @challenger)",
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
        lines += ["", "**No @champion yet**: no version has passed the quality gate."]
    else:
        shown = ", ".join(f"{k} {_num(v)} {_ci(headline, k)}".rstrip() for k, v in headline.items()
                          if not k.endswith(("_ci_low", "_ci_high")))
        lines += ["", f"**@champion: version {champion.version}** — {shown}."]
    return "\n".join(lines)
