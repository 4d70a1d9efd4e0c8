"""A built-in's name taken by another package is an error, whichever registers first."""

import subprocess
import sys

from tests.helpers import ROOT

TAKES_NTP_FIRST = """
from titan_objectives import Objective, registry
class Mine(Objective):
    pass
registry.add_objective("ntp", Mine, "module my_pkg")
try:
    registry.list_objectives()
except registry.RegistryError as error:
    print(error)
"""


def test_a_plugin_that_takes_a_builtins_name_first_is_named():
    result = subprocess.run(
        [sys.executable, "-c", TAKES_NTP_FIRST], capture_output=True, text=True, cwd=ROOT
    )
    assert result.stdout.strip() == (
        "objective 'ntp' is registered twice: by module my_pkg and by module "
        "titan_objectives.objectives.ntp"
    ), result.stderr
