"""Validation report: counts and every anomaly a reader met, with file names."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import pandas as pd

from ichflow.data.manifest import SUBTYPES, patient_table

log = logging.getLogger(__name__)


@dataclass
class Anomaly:
    kind: str      # short machine-readable tag, e.g. "orphan_annotation"
    path: str      # the file (or folder) concerned
    detail: str    # what is wrong and what the reader did about it


@dataclass
class ValidationReport:
    dataset: str
    root: str
    anomalies: list[Anomaly] = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    def warn(self, kind: str, path, detail: str, drops_data: bool = False) -> None:
        """Record an anomaly; one that drops data the user gave (``drops_data``) is also a warning line."""
        self.anomalies.append(Anomaly(kind, str(path), detail))
        if drops_data:
            log.warning("%s: %s (%s)", path, detail, kind)
        else:
            log.debug("%s: %s (%s)", kind, path, detail)

    def of_kind(self, kind: str) -> list[Anomaly]:
        return [a for a in self.anomalies if a.kind == kind]

    def summarise(self, manifest: pd.DataFrame) -> None:
        pt = patient_table(manifest)
        counts = {
            "patients": int(len(pt)),
            "slices": int(len(manifest)),
            "lesion_slices": int(manifest["has_lesion"].sum()),
            "lesion_patients": int(pt["positive"].sum()),
            "mask_slices": int(manifest["has_mask"].sum()),
            "mask_positive_slices": int((manifest["mask_pixels"] > 0).sum()),
            "box_count": int(manifest["boxes"].map(lambda b: len(json.loads(b))).sum()),
        }
        for s in SUBTYPES:
            col = manifest[s]
            if col.notna().any():
                counts[f"{s}_slices"] = int(col.fillna(0).sum())
                counts[f"{s}_patients"] = int((manifest.loc[col.fillna(0) > 0, "patient_id"]).nunique())
        by_kind: dict[str, int] = {}
        for a in self.anomalies:
            by_kind[a.kind] = by_kind.get(a.kind, 0) + 1
        counts["anomalies"] = by_kind
        self.counts = counts
        self._patients = pt

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "root": self.root, "counts": self.counts,
                "anomalies": [asdict(a) for a in self.anomalies]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self, max_per_kind: int = 50) -> str:
        c = self.counts
        lines = [f"# Validation report: {self.dataset}", "", f"Source: `{self.root}`", "",
                 "| count | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in c.items() if k != "anomalies"]
        lines += ["", "## Anomalies (warnings; the data was still read)", ""]
        if not self.anomalies:
            lines.append("None.")
        kinds = sorted({a.kind for a in self.anomalies})
        for kind in kinds:
            items = self.of_kind(kind)
            lines.append(f"### {kind} ({len(items)})")
            for a in items[:max_per_kind]:
                lines.append(f"- `{a.path}`: {a.detail}")
            if len(items) > max_per_kind:
                lines.append(f"- … {len(items) - max_per_kind} more (see validation_report.json)")
            lines.append("")
        pt = getattr(self, "_patients", None)
        if pt is not None:
            lines += ["## Per patient", "", pt.to_markdown() if _has_tabulate() else pt.to_string()]
        return "\n".join(lines) + "\n"


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False
