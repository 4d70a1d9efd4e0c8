"""``python -m tests.hosts.torchtitan_0_3.trainer_probe --module M --config FN``: the
objective trainer with a subclass of a test's, through ``train.main(trainer_class=...)``
as on 0.2.2: it builds, reports what it built, and trains nothing."""

from titan_objectives.hosts.torchtitan_0_3.runtime import cpu as cpu_runtime

cpu_runtime.activate()

from titan_objectives import train  # noqa: E402
from titan_objectives.hosts.torchtitan_0_3.trainer import ObjectiveTrainer  # noqa: E402


class ReportOnly(ObjectiveTrainer):
    def train(self) -> None:
        print(f"built {type(self).__name__} with {', '.join(self.objectives.stack)}")


if __name__ == "__main__":
    train.main(trainer_class=ReportOnly)
