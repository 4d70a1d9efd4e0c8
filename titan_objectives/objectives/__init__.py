"""Built-in objectives (``registry.BUILTINS`` names them)."""

from titan_objectives.objectives.mtp import MTPOptions, MultiTokenPrediction
from titan_objectives.objectives.nitp import NextImplicitTokenPrediction, NITPOptions
from titan_objectives.objectives.ntp import NextTokenPrediction, NTPOptions
from titan_objectives.objectives.top import TokenOrderPrediction, TOPOptions

__all__ = [
    "MTPOptions",
    "MultiTokenPrediction",
    "NextImplicitTokenPrediction",
    "NextTokenPrediction",
    "NITPOptions",
    "NTPOptions",
    "TokenOrderPrediction",
    "TOPOptions",
]
