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


RUNTIME = cpu_patches.CPURuntime(
    __name__, _import_tools_utils, before=(_install_moe_kernels_without_triton,)
)
activate = RUNTIME.activate
exit_after_training = RUNTIME.exit_after_training
