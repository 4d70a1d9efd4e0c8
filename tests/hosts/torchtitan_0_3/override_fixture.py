"""A torchtitan 0.3 override (``--override.imports``) that widens every block's
feed-forward to 512: the objectives' blocks must be built like the overridden trunk's."""

import dataclasses

from torchtitan.config.override import override
from torchtitan.models.common.feed_forward import FeedForward


@override(target=FeedForward.Config, fqns=["*layers.*.feed_forward"])
def wider_feed_forward(config: FeedForward.Config) -> FeedForward.Config:
    return dataclasses.replace(
        config,
        w1=dataclasses.replace(config.w1, out_features=512),
        w3=dataclasses.replace(config.w3, out_features=512),
        w2=dataclasses.replace(config.w2, in_features=512),
    )
