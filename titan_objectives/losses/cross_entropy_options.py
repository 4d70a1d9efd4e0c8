"""The options of an objective that computes the LM head's cross-entropy (ntp, mtp)."""

from dataclasses import dataclass
from typing import Literal

import torch

from titan_objectives.losses.linear_cross_entropy import torch_has_linear_cross_entropy
from titan_objectives.objective import OptionError

CrossEntropyBackend = Literal["auto", "torch", "chunked", "plain"]


@dataclass
class CrossEntropyOptions:
    """Mixed into an objective's options (before ``ObjectiveOptions``) to give it these two
    keys and their checks."""

    chunk_size: int = 0
    """0: cross-entropy of full logits. N > 0: memory-efficient, N tokens at a time, never
    holding [tokens, vocab] logits (the model then skips its own logits when nothing else
    reads them)."""

    ce_backend: CrossEntropyBackend = "auto"
    """'auto': with chunk_size > 0, PyTorch's linear_cross_entropy where the installed
    torch has it (2.13+) and the head is whole, else ours (also under tensor parallelism);
    'torch' or 'chunked' force one (chunk_size > 0); 'plain' is the full logits
    (chunk_size = 0)."""

    def validate_cross_entropy(self) -> None:
        """Raise ``OptionError`` for a chunk size or backend that cannot run here."""
        if self.chunk_size < 0:
            raise OptionError("chunk_size", self.chunk_size, "0 (off) or a number of tokens > 0")
        if self.ce_backend == "plain" and self.chunk_size:
            raise OptionError(
                "ce_backend",
                self.ce_backend,
                f"'auto', 'torch' or 'chunked' with chunk_size = {self.chunk_size}; 'plain' "
                "computes the full logits (chunk_size = 0)",
            )
        if self.ce_backend in ("torch", "chunked") and not self.chunk_size:
            raise OptionError(
                "ce_backend",
                self.ce_backend,
                "'auto' or 'plain' with chunk_size = 0; set chunk_size to a number of tokens "
                f"to use {self.ce_backend!r}",
            )
        if self.ce_backend == "torch" and not torch_has_linear_cross_entropy():
            raise OptionError(
                "ce_backend",
                self.ce_backend,
                f"'auto' or 'chunked': torch {torch.__version__} has no "
                "torch.nn.functional.linear_cross_entropy (PyTorch 2.13 and later)",
            )
