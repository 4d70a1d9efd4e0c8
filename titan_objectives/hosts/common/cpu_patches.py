"""CPU patches both torchtitan hosts need, applied by each host's ``runtime.cpu``.

torchtitan picks ``cuda`` when no accelerator is found and asks the device module for
memory statistics and device indices ``torch.cpu`` does not have; FSDP2 reduces
gradients with ``PREMUL_SUM``, which gloo lacks; MoE routers count integer expert ids
with ``torch.histc``, which CPU refuses; context parallelism has no ring attention for
the CPU attention kernel (``cpu_context_parallel``).
"""

import functools
import inspect
import logging
import os
import resource
import sys
import types
from collections.abc import Callable

import torch

from titan_objectives.hosts.common.cpu_context_parallel import (
    ATTENTION_MODULES,
    ring_attention_for_cpu_sdpa,
)


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


def needed(runtime: str) -> bool:
    """Whether a host's CPU runtime (module ``runtime``) must patch: no CUDA device. It
    must run before torchtitan is imported (torchtitan fixes its device type then)."""
    if torch.cuda.is_available():
        return False
    if "torchtitan" in sys.modules:
        raise RuntimeError(
            f"{runtime}.activate() must run before torchtitan is imported: torchtitan "
            "fixes its device type at import time"
        )
    return True


def import_torchtitan_with_cpu_device(import_tools_utils: Callable[[], types.ModuleType]) -> None:
    """torchtitan binds ``device_type`` and ``device_module`` from ``torch._utils`` when
    ``torchtitan.tools.utils`` is first imported, and falls back to ``cuda``. Answer
    ``cpu`` (and a CPU device module) while the host imports it
    (``import_tools_utils``); torch itself is left as it was."""
    original_type = torch._utils._get_available_device_type
    original_module = torch._utils._get_device_module
    torch._utils._get_available_device_type = lambda: "cpu"
    torch._utils._get_device_module = lambda device_type: _CPUDeviceModule()
    try:
        titan_utils = import_tools_utils()
    finally:
        torch._utils._get_available_device_type = original_type
        torch._utils._get_device_module = original_module
    assert titan_utils.device_type == "cpu", titan_utils.device_type


def force_sum_reductions_in_fsdp() -> None:
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


def histc_of_integers() -> None:
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


def exit_now() -> None:
    """End the process now that training has finished and torchtitan has closed its
    writers and destroyed the process group.

    With gloo on CPU, about one 2-process run in eight (plain torchtitan included) aborts
    during interpreter teardown with "terminate called without an active exception": a
    native thread is still joinable when its owner is destroyed. Nothing is left to do
    at that point, so skip the teardown rather than report a crash for a finished run.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class CPURuntime:
    """A host's CPU runtime: ``before`` (what must precede torchtitan's import), the
    patches both hosts need, then ``after``; applied once, before torchtitan is imported,
    and not at all when CUDA is available. ``import_tools_utils`` imports the host's
    ``torchtitan.tools.utils`` (this module imports no torchtitan)."""

    def __init__(
        self,
        name: str,
        import_tools_utils: Callable[[], types.ModuleType],
        before: tuple[Callable[[], None], ...] = (),
        after: tuple[Callable[[], None], ...] = (),
    ):
        self.name, self.import_tools_utils = name, import_tools_utils
        self.before, self.after = before, after
        self.active = False

    def activate(self) -> bool:
        """Apply the patches if there is no CUDA device. Returns whether they are active."""
        if self.active:
            return True
        if not needed(self.name):
            return False
        for patch in self.before:
            patch()
        import_torchtitan_with_cpu_device(self.import_tools_utils)
        force_sum_reductions_in_fsdp()
        histc_of_integers()
        ring_attention_for_cpu_sdpa()
        for patch in self.after:
            patch()
        self.active = True
        return True

    def exit_after_training(self) -> None:
        """End the process once training has finished (see ``exit_now``)."""
        if self.active:
            exit_now()


# The private parts of torch and torchtitan these patches touch (each host's seams list
# them: module, attribute path, user module relative to the host, why).
CPU_SEAMS: tuple[tuple[str, str, str, str], ...] = (
    (
        "torchtitan.tools.utils",
        "device_type",
        "../common/cpu_patches",
        "bound at import from torch._utils: must say cpu without an accelerator",
    ),
    (
        "torch._utils",
        "_get_available_device_type",
        "../common/cpu_patches",
        "answers cpu while torchtitan.tools.utils is first imported",
    ),
    (
        "torch._utils",
        "_get_device_module",
        "../common/cpu_patches",
        "a CPU device module with the memory statistics torchtitan's metrics read",
    ),
    (
        "torch.distributed.fsdp._fully_shard._fsdp_collectives",
        "_get_gradient_divide_factors",
        "../common/cpu_patches",
        "force SUM reductions: gloo has no PREMUL_SUM",
    ),
    *(
        (
            ATTENTION_MODULES[0],
            attribute,
            "../common/cpu_context_parallel",
            "ring attention for the CPU SDPA kernel under context parallelism",
        )
        for attribute in (
            "custom_ops",
            "_templated_ring_attention",
            "_templated_ring_attention_backward",
        )
    ),
)
