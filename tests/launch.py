"""``python -m tests.launch MODULE ARGS``: ``python -m MODULE ARGS`` for the suite's
trainings, without the 2 s torchtitan's trainer sleeps on rank 0 after the last step
("for other ranks to complete": every rank has passed the last step's collectives by
then, and torchrun waits for all of them anyway). The suite runs a few hundred trainings,
one after another per test process."""

import runpy
import sys
import time

TRAINERS = ("torchtitan.train", "torchtitan.trainer")  # torchtitan 0.2.2, 0.3
_sleep = time.sleep


def sleep(seconds: float) -> None:
    """``time.sleep``, except when torchtitan's trainer module calls it."""
    if sys._getframe(1).f_globals.get("__name__") not in TRAINERS:
        _sleep(seconds)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tests.launch MODULE [ARGS ...]")
    time.sleep = sleep
    module = sys.argv.pop(1)
    runpy.run_module(module, run_name="__main__", alter_sys=True)
