"""torchtitan's private parts we touch still exist, and another torchtitan is refused."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT, assert_seam_exists_and_is_used
from titan_objectives.hosts.torchtitan_0_2.seams import PRIVATE_SEAMS, SUPPORTED_TORCHTITAN


@pytest.mark.parametrize(
    ("module", "attribute", "user", "why"), PRIVATE_SEAMS, ids=lambda v: str(v)[:40]
)
def test_every_private_seam_still_exists_and_is_used_where_listed(module, attribute, user, why):
    assert_seam_exists_and_is_used("torchtitan_0_2", module, attribute, user)


def test_another_torchtitan_is_refused_at_import_naming_both_versions():
    fake_version = (
        "import importlib.metadata as m; real = m.version; "
        "m.version = lambda name: '0.3.0' if name == 'torchtitan' else real(name); "
        "import titan_objectives.hosts.torchtitan_0_2"
    )
    result = subprocess.run(
        [sys.executable, "-c", fake_version], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode != 0
    assert (
        f"titan_objectives.hosts.torchtitan_0_2 is the host for torchtitan {SUPPORTED_TORCHTITAN} "
        "(TOML job configs), and torchtitan 0.3.0 is installed" in " ".join(result.stderr.split())
    )
