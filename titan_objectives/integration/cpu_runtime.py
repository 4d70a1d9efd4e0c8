"""Lets torchtitan 0.2.2 train on a machine without an accelerator, with gloo.

As shipped, torchtitan picks ``cuda`` when no accelerator is found, imports a Triton
kernel at package import (CPU builds of torch have no triton), asks the device module
for memory statistics and device indices ``torch.cpu`` does not have, and lets FSDP2
reduce gradients with ``PREMUL_SUM``, which gloo lacks, and its MoE router counts integer
expert ids with ``torch.histc``, which CPU refuses. ``activate()`` fixes exactly
these, before torchtitan is imported, and does nothing when CUDA is available.
"""

import functools
import importlib
import inspect
import logging
import os
import resource
import sys
import types

import torch

_active = False


def is_active() -> bool:
    return _active


def activate() -> bool:
    """Apply the CPU patches if there is no CUDA device. Returns whether they are active."""
    global _active
    if _active:
        return True
    if torch.cuda.is_available():
        return False
    if "torchtitan" in sys.modules:
        raise RuntimeError(
            "titan_objectives.integration.cpu_runtime.activate() must run before torchtitan "
            "is imported: torchtitan fixes its device type at import time"
        )
    _install_moe_kernels_without_triton()
    _import_torchtitan_with_cpu_device()
    _force_sum_reductions_in_fsdp()
    _histc_of_integers()
    _active = True
    return True


def _install_moe_kernels_without_triton() -> None:
    """``torchtitan.models.moe.kernels`` imports triton at module level; provide the one
    function MoE uses, in plain PyTorch, under the same module name."""
    if importlib.util.find_spec("triton") is not None:
        return
    from titan_objectives.integration import moe_permute

    module = types.ModuleType("torchtitan.models.moe.kernels")
    module.generate_permute_indices = moe_permute.generate_permute_indices
    module.__all__ = ["generate_permute_indices"]
    sys.modules[module.__name__] = module


class _CPUDeviceModule(types.ModuleType):
    """``torch.cpu`` plus what torchtitan asks of a device module: a device index for
    barriers and memory statistics. For memory, the process's peak resident set, which is
    what a user wants to watch on CPU."""

    def __init__(self) -> None:
        super().__init__("titan_objectives_cpu_device")

    def __getattr__(self, name: str) -> object:
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def get_device_name(device: object = None) -> str:
        return "CPU"

    @staticmethod
    def get_device_properties(device: object = None) -> types.SimpleNamespace:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return types.SimpleNamespace(total_memory=total, name="CPU")

    @staticmethod
    def memory_stats(device: object = None) -> dict[str, int]:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak}

    @staticmethod
    def reset_peak_memory_stats(device: object = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass


def _import_torchtitan_with_cpu_device() -> None:
    """torchtitan binds ``device_type`` and ``device_module`` from ``torch._utils`` when
    ``torchtitan.tools.utils`` is first imported, and falls back to ``cuda``. Answer
    ``cpu`` (and a CPU device module) for that one import; torch itself is left as it was."""
    original_type = torch._utils._get_available_device_type
    original_module = torch._utils._get_device_module
    torch._utils._get_available_device_type = lambda: "cpu"
    torch._utils._get_device_module = lambda device_type: _CPUDeviceModule()
    try:
        import torchtitan  # noqa: F401
        import torchtitan.tools.utils as titan_utils
    finally:
        torch._utils._get_available_device_type = original_type
        torch._utils._get_device_module = original_module
    assert titan_utils.device_type == "cpu", titan_utils.device_type


def _force_sum_reductions_in_fsdp() -> None:
    """torchtitan sets FSDP2's gradient divide factor to 1 (it normalizes by the token
    count itself), for which FSDP2 reduce-scatters with ``PREMUL_SUM(1.0)``: gloo has no
    such op. A plain SUM is the same reduction."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    original = _fsdp_collectives._get_gradient_divide_factors
    signature = inspect.signature(original)

    def sum_only(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["force_sum_reduction_for_comms"] = True
        return original(*bound.args, **bound.kwargs)

    _fsdp_collectives._get_gradient_divide_factors = sum_only


def _histc_of_integers() -> None:
    """torchtitan's MoE router counts tokens per expert with ``torch.histc`` on integer
    expert ids, which CUDA accepts and CPU does not; count them as floats there and hand
    back integers, as CUDA does."""
    original = torch.histc

    @functools.wraps(original)
    def histc(input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if input.is_floating_point():
            return original(input, *args, **kwargs)
        # CUDA keeps the integer dtype; so do we.
        return original(input.float(), *args, **kwargs).to(input.dtype)

    torch.histc = histc


def exit_after_training() -> None:
    """End the process now that training has finished and torchtitan has closed its
    writers and destroyed the process group.

    With gloo on CPU, about one 2-process run in eight (plain torchtitan included) aborts
    during interpreter teardown with "terminate called without an active exception": a
    native thread is still joinable when its owner is destroyed. Nothing is left to do
    at that point, so skip the teardown rather than report a crash for a finished run.
    """
    if not _active:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
