"""Section 5: wall time of ``prepare`` and of one training epoch at 1×, 2×, 4× the synthetic data.

prepare: the entry point body (:func:`ichflow.prepare.run_prepare`: read and validate every slice, split by
patient, write manifest/split/report, log them and the dataset inputs to MLflow), cold (``prepared/``
removed before each call); the phantom itself is generated beforehand, untimed. Sizes are interleaved per
repeat; median of the repeats.

epoch: the classification entry point (``train_classification``, one pass over the training slices per
epoch, 96 px slices to keep the 4× run short) for 2 epochs at each size; an epoch's wall time runs from the
start of its training pass to the end of its validation, metric logging and checkpoint (the ``on_epoch_end``
hook); the second epoch is reported (the first carries DataLoader worker start-up).
"""

from __future__ import annotations

import shutil
import time

from benchmarks.core import median, patched, scaling_exponent, steady

FACTORS = (1, 2, 4)


def run(quick: bool) -> dict:
    from ichflow.engine import trainer as tr
    from ichflow.paths import prepared_dir
    from ichflow.prepare import DataConfig, resolve_source, run_prepare
    from ichflow.tasks.classification import ClassificationConfig, train_classification

    base = DataConfig().synthetic_patients
    reps = 2 if quick else 3
    cfgs = {f: DataConfig(synthetic_patients=base * f) for f in FACTORS}
    for cfg in cfgs.values():
        resolve_source(cfg)  # generate the phantom (untimed)
    shutil.rmtree(prepared_dir(), ignore_errors=True)
    run_prepare(cfgs[FACTORS[0]])  # warm-up (imports, first MLflow experiment), untimed
    times: dict[int, list[float]] = {f: [] for f in FACTORS}
    slices: dict[int, int] = {}
    for _ in range(reps):
        for f, cfg in cfgs.items():
            shutil.rmtree(prepared_dir(), ignore_errors=True)
            t0 = time.perf_counter()
            prep = run_prepare(cfg)
            times[f].append(time.perf_counter() - t0)
            slices[f] = len(prep.manifest)
    prepare = {"points": [{"factor": f, "patients": base * f, "slices": slices[f], "seconds": median(times[f]),
                           "runs": times[f]} for f in FACTORS]}
    prepare["exponent"] = scaling_exponent([p["slices"] for p in prepare["points"]],
                                           [p["seconds"] for p in prepare["points"]])

    epochs = 2  # the second epoch is the measured one (the first carries worker start-up)
    points = []
    for f in FACTORS:
        starts, ends, train_phase = [], [], []
        orig = tr.Trainer.train_epoch

        def train_epoch(self, loader, epoch, steps=None, _orig=orig):
            starts.append(time.perf_counter())
            out = _orig(self, loader, epoch, steps)
            train_phase.append(out["epoch_seconds"])
            return out

        cfg = ClassificationConfig(synthetic_patients=base * f, epochs=epochs, patience=epochs, image_size=96,
                                   evaluate_test=False, register=False, n_boot=0, gradcam_per_group=0)
        with patched(tr.Trainer, "train_epoch", train_epoch):
            train_classification(cfg, on_epoch_end=lambda e, m: ends.append(time.perf_counter()))
        walls = [e - s for s, e in zip(starts, ends)]
        points.append({"factor": f, "patients": base * f, "slices": slices[f], "seconds": median(steady(walls)),
                       "runs": walls, "train_pass_seconds": median(steady(train_phase)),
                       "train_pass_runs": train_phase})
    epoch = {"points": points, "task": "classification",
             "exponent": scaling_exponent([p["slices"] for p in points], [p["seconds"] for p in points])}
    return {"prepare": prepare, "epoch": epoch, "repeats": reps, "base_patients": base}
