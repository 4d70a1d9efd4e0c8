"""Built-in objectives. Importing this package registers them."""

from titan_objectives.objectives.nitp import NextImplicitTokenPrediction, NITPOptions
from titan_objectives.objectives.ntp import NextTokenPrediction, NTPOptions

__all__ = [
    "NextImplicitTokenPrediction",
    "NextTokenPrediction",
    "NITPOptions",
    "NTPOptions",
]
