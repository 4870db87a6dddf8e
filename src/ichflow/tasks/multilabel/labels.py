"""Label columns of the selected classes: the manifest's subtype flags, and ``any`` (any hemorrhage).

``any`` is derived, not read: a slice is positive when any class column the source labelled is positive
(on CT-ICH the five subtypes; on a labels CSV every class column it lists). A labels CSV with its own
``any`` column keeps it. Deriving it in the manifest, before folds, support and ``y`` are made from it,
lets every later step treat it as one more class column.
"""

from __future__ import annotations

import pandas as pd

from ichflow.data.manifest import COLUMNS, SUBTYPES

ANY = "any"


def class_columns(manifest: pd.DataFrame) -> list[str]:
    """Columns that carry class labels: the subtype columns the source filled, and a labels CSV's own
    class columns (the only columns a manifest has beyond its canonical ones)."""
    subtypes = [s for s in SUBTYPES if s in manifest.columns and manifest[s].notna().any()]
    return subtypes + [c for c in manifest.columns if c not in COLUMNS and c != ANY]


def any_label(manifest: pd.DataFrame) -> pd.Series:
    """1 where any labelled class is positive on the slice, 0 elsewhere; all missing when the source has
    no class labels (PHE), so the task's 'no labels for' check still names it."""
    cols = class_columns(manifest)
    if not cols:
        return pd.Series(pd.NA, index=manifest.index, dtype="Int8", name=ANY)
    flags = manifest[cols].astype("Float64").fillna(0).to_numpy(dtype=float) > 0
    return pd.Series(flags.any(axis=1).astype("int8"), index=manifest.index, dtype="Int8", name=ANY)


def with_derived(manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """``manifest`` with an ``any`` column when ``any`` is selected and the data has none of its own."""
    if ANY not in classes or ANY in manifest.columns:
        return manifest
    return manifest.assign(**{ANY: any_label(manifest)})
