"""The objective runtime every host shares (``runtime``: the training step, metrics,
geometry, non-finite guard, validation scoring; ``parallelize``, ``checks``,
``checkpoint_state``): plain PyTorch, importing no torchtitan module, not even inside a
function. A host hands it what differs (``runtime.Host``)."""
