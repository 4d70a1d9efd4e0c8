"""Built-in objectives. Importing this package registers them."""

from titan_objectives.objectives.mtp import MTPOptions, MultiTokenPrediction
from titan_objectives.objectives.nitp import NextImplicitTokenPrediction, NITPOptions
from titan_objectives.objectives.ntp import NextTokenPrediction, NTPOptions

__all__ = [
    "MTPOptions",
    "MultiTokenPrediction",
    "NextImplicitTokenPrediction",
    "NextTokenPrediction",
    "NITPOptions",
    "NTPOptions",
]
