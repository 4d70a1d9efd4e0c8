"""What both hosts' export tests check of a ``titan-objectives export`` folder, written
against transformers and safetensors directly (not through the project's own helpers)."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT

TOKENIZER = ROOT / "assets" / "tokenizer-bpe2k-tiny"

# fp32 on the CPU, the same weights: transformers and torchtitan agree to ~2e-6; a norm
# epsilon of 1e-6 instead of 1e-5 moves the logits by ~4e-5, a missing rotary permutation
# by ~2e-2 (measured on the llama3 debug model).
LOGITS_TOLERANCE = 1e-5


def exported_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        return list(weights.keys())


def transformers_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def assert_transformers_computes(
    folder: Path,
    tokens: torch.Tensor,
    expected: torch.Tensor,
    tolerance: float = LOGITS_TOLERANCE,
    kl: float = 1e-9,
) -> None:
    """``folder`` loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` as it is, holds
    no auxiliary module, and computes ``expected`` (the torchtitan model's logits)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    keys = exported_keys(folder)
    assert keys and all(k.startswith(("model.", "lm_head.")) for k in keys), keys
    assert not any("objectives" in k or "projector" in k for k in keys)
    config = json.loads((folder / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)

    text = "Alice was beginning to get very tired of sitting by her sister"
    run_tokenizer = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    assert AutoTokenizer.from_pretrained(str(folder)).encode(text) == run_tokenizer.encode(text).ids

    assert_logits_agree(folder.name, transformers_logits(folder, tokens), expected, tolerance, kl)


def assert_logits_agree(
    name: str, logits: torch.Tensor, expected: torch.Tensor, tolerance: float, kl: float
) -> None:
    """The largest difference below ``tolerance`` and the KL divergence of the softmaxes
    below ``kl`` (both printed)."""
    logits, expected = logits.double(), expected.double()
    difference = (logits - expected).abs().max().item()
    log_p, log_q = expected.log_softmax(-1), logits.log_softmax(-1)
    divergence = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    print(f"{name}: largest logit difference {difference:.2e}, KL {divergence:.2e}")
    assert difference < tolerance and divergence < kl, (
        f"logits disagree: largest difference {difference:.2e}, KL {divergence:.2e}"
    )


def assert_the_check_sees_a_wrong_epsilon_or_rotary_layout(
    folder: Path, tokens: torch.Tensor, expected: torch.Tensor, unpermuted_wq: torch.Tensor
) -> None:
    """``assert_transformers_computes`` passes on the llama3 export in ``folder`` and fails
    on it with a norm epsilon of 1e-6, or with block 0's query weights as torchtitan holds
    them (``unpermuted_wq``: the rotary permutation to transformers' layout missing)."""
    from safetensors.torch import load_file, save_file

    assert_transformers_computes(folder, tokens, expected)
    config = json.loads((folder / "config.json").read_text())
    assert config["rms_norm_eps"] != 1e-6
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    with pytest.raises(AssertionError, match="logits disagree"):
        assert_transformers_computes(folder, tokens, expected)
    (folder / "config.json").write_text(json.dumps(config))

    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"] = unpermuted_wq.detach().contiguous()
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(AssertionError, match="logits disagree"):
        assert_transformers_computes(folder, tokens, expected)


def verified_difference(printed: str) -> float:
    """The largest logit difference ``export --verify`` printed (its last line)."""
    line = printed.splitlines()[-1]
    assert line.startswith("transformers' logits vs torchtitan's on 128 tokens (fp32)"), line
    return float(line.split("largest difference ")[1].split(",")[0])
