"""nnU-Net v2 as a segmentation engine (``-P engine=nnunet``): nnU-Net's own planning, 2d U-Net and predictor.

- :func:`~ichflow.tasks.segmentation.nnunet.engine.train_nnunet`: the prepared train/val split as an nnU-Net
  raw dataset (one 3D case per patient; the test split is never written), fingerprint, plan and preprocess the
  ``2d`` configuration, train within the run's budget (per-epoch losses and pseudo-Dice streamed to MLflow);
  returns a :class:`~ichflow.tasks.segmentation.nnunet.engine.NnUNetNetwork`.
- :func:`~ichflow.tasks.segmentation.nnunet.evaluate.evaluate_split`: whole-scan counts of a split, the
  :class:`~ichflow.tasks.segmentation.metrics.SplitStats` the smp engine's report code takes.
- :func:`~ichflow.tasks.segmentation.nnunet.pyfunc.log_model`: the served model, with the smp model's
  signature and input/output contract.

nnU-Net is configured by environment variables. The folders (nnUNet_raw, _preprocessed, _results) are read when
used, so :func:`~ichflow.tasks.segmentation.nnunet.engine.train_nnunet` sets them while it trains;
``nnUNet_def_n_proc`` is read once, when nnunetv2 is first imported, hence it is set here.
"""

import os

# nnU-Net's default of 8 threads/processes oversubscribes small machines (its resampling sets torch's threads)
os.environ.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))
