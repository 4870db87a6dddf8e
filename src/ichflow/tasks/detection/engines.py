"""The detection engines by name: a new engine is one module with a class as ``base`` describes, listed here."""

from __future__ import annotations

from ichflow.errors import check_choice
from ichflow.tasks.detection.fasterrcnn import FasterRCNNEngine
from ichflow.tasks.detection.yolo import YoloEngine

ENGINES = {engine.name: engine for engine in (YoloEngine, FasterRCNNEngine)}


def engine_class(name: str):
    """The engine called ``name``; an unknown name is a ParameterError naming ``engine`` and the valid names."""
    check_choice("engine", name, tuple(ENGINES))
    return ENGINES[name]
