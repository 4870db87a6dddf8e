"""What every detection engine provides (``engines.ENGINES`` lists them by name).

An engine is a class with::

    name                                       its ``engine`` parameter value
    default_lr                                 the learning rate of ``lr=0`` (AdamW)
    check(cfg)                                 its own parameter checks (ParameterError / DataError), no work
    slices(cfg, prep) -> DataFrame             the slice table (``dataset.slice_table`` columns) it trains on;
                                               logs its own data params / artifacts
    train(cfg, prep, folder, device, on_epoch_end, budget) -> EngineFit
                                               per-epoch metrics into the active run (step=epoch), stops when
                                               ``budget.should_stop(epoch)``, keeps the best weights
    predict(part) -> [(boxes xyxy, scores)]    every box down to ``BOX_CONF`` per row of ``part``, in the
                                               slice's original pixel frame
    load_predictor(weights, config, device)    the served model's predictor (``pyfunc``), from the files
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ichflow.engine.trainer import FitResult

BOX_CONF = 0.001   # every box down to this score is kept for evaluation (mAP needs the whole ranking)


@dataclass
class EngineFit(FitResult):
    """The engine's FitResult; ``checkpoint`` is the best weights, ``model_config`` what the pyfunc needs."""

    model_config: dict = field(default_factory=dict)

    @property
    def weights(self) -> Path:
        return Path(self.checkpoint)
