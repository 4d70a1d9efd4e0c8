"""Lets torchtitan 0.2.2 train on a machine without an accelerator, with gloo.

Besides the patches both hosts need (``hosts.common.cpu_patches``: device type and
module, SUM reductions in FSDP2, integer ``histc``), torchtitan 0.2.2 imports a Triton
kernel at package import, which CPU builds of torch cannot: a plain-PyTorch module
stands in. ``activate()`` applies them before torchtitan is imported, and does nothing
when CUDA is available.
"""

import importlib
import sys
import types

from titan_objectives.hosts.common import cpu_patches

_active = False


def activate() -> bool:
    """Apply the CPU patches if there is no CUDA device. Returns whether they are active."""
    global _active
    if _active:
        return True
    if not cpu_patches.needed(__name__):
        return False
    _install_moe_kernels_without_triton()
    cpu_patches.import_torchtitan_with_cpu_device(_import_tools_utils)
    cpu_patches.force_sum_reductions_in_fsdp()
    cpu_patches.histc_of_integers()
    _active = True
    return True


def _install_moe_kernels_without_triton() -> None:
    """``torchtitan.models.moe.kernels`` imports triton at module level; provide the one
    function MoE uses, in plain PyTorch, under the same module name."""
    if importlib.util.find_spec("triton") is not None:
        return
    from titan_objectives.hosts.torchtitan_0_2.runtime import moe_permute

    module = types.ModuleType("torchtitan.models.moe.kernels")
    module.generate_permute_indices = moe_permute.generate_permute_indices
    module.__all__ = ["generate_permute_indices"]
    sys.modules[module.__name__] = module


def _import_tools_utils() -> types.ModuleType:
    import torchtitan.tools.utils

    return torchtitan.tools.utils


def exit_after_training() -> None:
    """End the process once training has finished (see ``cpu_patches.exit_now``)."""
    if _active:
        cpu_patches.exit_now()
