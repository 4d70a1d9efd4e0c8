"""``titan-objectives export`` on torchtitan 0.3: a saved model of each exportable family
loads in transformers with the same logits; a trained run (the main job) exports from its
full and its model-only checkpoint and is scored by lm-eval."""

import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from tests.export_checks import (
    LOGITS_TOLERANCE,
    TOKENIZER,
    assert_the_check_sees_a_wrong_epsilon_or_rotary_layout,
    assert_transformers_computes,
    verified_difference,
)
from tests.hosts.torchtitan_0_3.test_train_e2e import train
from titan_objectives.cli import main
from titan_objectives.hosts.common.run_record import RunRecord, as_record, write_record


def flavor_config(name: str, flavor: str = "debugmodel", seq_len: int = 64, layers: int = 0):
    """torchtitan's ``flavor`` of ``name`` (its first ``layers`` blocks, if not 0), at the
    sequence length a run trains with."""
    import importlib

    spec = importlib.import_module(f"torchtitan.models.{name}").model_registry(flavor)
    config = spec.model
    if layers:
        config = dataclasses.replace(config, layers=config.layers[:layers])
    for layer in config.layers:
        layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=seq_len)
    return config


def built(config, state: dict[str, torch.Tensor] | None = None):
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_states(buffer_device=torch.device("cpu"))
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def experts_in_fp32(model) -> None:
    """torchtitan 0.3 runs its grouped experts in bf16; the reference here runs them in
    fp32 (the exported model's precision), one expert at a time."""
    from torchtitan.models.common.moe import GroupedExperts

    def forward(self, x, num_tokens_per_expert):
        outputs, start = [], 0
        for expert, count in enumerate(num_tokens_per_expert.tolist()):
            rows = x[start : start + count]
            start += count
            hidden = F.silu(rows @ self.w1_EFD[expert].T) * (rows @ self.w3_EFD[expert].T)
            outputs.append(hidden @ self.w2_EDF[expert].T)
        outputs.append(x.new_zeros(x.shape[0] - start, self.w2_EDF.shape[1]))
        return torch.cat(outputs)

    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.forward = types.MethodType(forward, module)


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """One document per row, as torchtitan 0.3's step masks it."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, model.get_attention_masks(positions=positions))


def tokens_for(config) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))


def saved_run(folder: Path, name: str, flavor: str = "debugmodel", layers: int = 0):
    """A run folder as training leaves it (record, DCP checkpoint with an objective's
    module in it), from a seeded model whose norm weights are not all ones."""
    config = flavor_config(name, flavor, layers=layers)
    torch.manual_seed(0)
    model = built(config)
    experts_in_fp32(model)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "norm" in key:
                parameter.uniform_(0.5, 1.5)
    state = {**model.state_dict(), "objectives.nitp.projector.weight": torch.ones(4, 4)}
    dcp.save(state, checkpoint_id=str(folder / "checkpoint" / "step-2"), no_dist=True)
    record = RunRecord(
        "torchtitan_0_3",
        name,
        flavor,
        as_record(config),
        str(TOKENIZER),
        "checkpoint",
        ["ntp", "nitp"],
    )
    write_record(folder, record)
    return model, config


@pytest.mark.parametrize(
    "name, flavor, layers",
    [("llama3", "debugmodel", 0), ("qwen3", "debugmodel", 0), ("qwen3", "debugmodel_moe", 2)],
)
def test_a_saved_model_loads_in_transformers_with_the_same_logits(tmp_path, name, flavor, layers):
    model, config = saved_run(tmp_path / "run", name, flavor, layers)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    tokens = tokens_for(config)
    assert_transformers_computes(tmp_path / "hf", tokens, logits(model, tokens))


def test_the_logits_check_catches_a_wrong_norm_epsilon_or_rotary_layout(tmp_path):
    """The check of the export tests fails on either mistake."""
    model, config = saved_run(tmp_path / "run", "llama3")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    tokens = tokens_for(config)
    unpermuted = model.state_dict()["layers.0.attention.qkv_linear.wq.weight"]
    assert_the_check_sees_a_wrong_epsilon_or_rotary_layout(
        tmp_path / "hf", tokens, logits(model, tokens), unpermuted
    )


def test_verify_reports_the_agreement(tmp_path, capsys):
    """--verify builds 0.3's model from the checkpoint and runs it as 0.3's step does."""
    saved_run(tmp_path / "run", "llama3")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--verify"]) == 0
    assert verified_difference(capsys.readouterr().out) < LOGITS_TOLERANCE


@pytest.mark.slow
def test_a_trained_run_exports_and_is_scored(tmp_path):
    """The main job with checkpoints at step 2 (full: the objectives' modules and the
    optimizer in it) and step 4 (model-only); both export; lm-eval scores the run."""
    checkpoints = ("--checkpoint.enable", "--checkpoint.interval", "2")
    train(tmp_path, "llama3_debug_nitp", "--training.steps", "4", *checkpoints)
    config = flavor_config("llama3")
    tokens = tokens_for(config)
    for step in (2, 4):
        state = built(config).state_dict()
        dcp.load(state, checkpoint_id=str(tmp_path / "checkpoint" / f"step-{step}"))
        out = tmp_path / f"hf-{step}"
        assert main(["export", str(tmp_path), "--out", str(out), "--step", str(step)]) == 0
        assert_transformers_computes(out, tokens, logits(built(config, state), tokens))

    limit = ("--tasks", "tangled_tale_cloze,tangled_tale_perplexity", "--limit", "4")
    assert main(["evaluate", str(tmp_path), *limit]) == 0
    (results,) = (tmp_path / "eval").glob("results_*.json")
    scored = json.loads(results.read_text())["results"]
    assert 0 <= scored["tangled_tale_cloze"]["acc,none"] <= 1
    assert scored["tangled_tale_perplexity"]["bits_per_byte,none"] > 0
    assert (tmp_path / "hf" / "step-4" / "model.safetensors").is_file()  # the last step


def run_without_weights(folder: Path, host: str, model: str) -> None:
    """A run record and a complete (empty) checkpoint at step 1: what the export checks
    before it reads any tensor."""
    record = RunRecord(host, model, "debugmodel", {}, str(TOKENIZER), "checkpoint", ["ntp"])
    write_record(folder, record)
    (folder / "checkpoint" / "step-1").mkdir(parents=True)
    (folder / "checkpoint" / "step-1" / ".metadata").touch()  # complete, as DCP leaves it


def test_bad_steps_and_families_are_named(tmp_path, capsys):
    run_without_weights(tmp_path, "torchtitan_0_3", "deepseek_v3")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "a"), "--step", "3"]) == 2
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    errors = capsys.readouterr().err
    assert "--step 3: the run has no checkpoint at that step; it has steps 1" in errors
    assert "model 'deepseek_v3' cannot be exported for Hugging Face transformers" in errors
    assert "DeepseekV3 routes experts by sigmoid scores only" in errors
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_record_from_the_other_host_is_named(tmp_path, capsys):
    run_without_weights(tmp_path, "torchtitan_0_2", "llama3")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "trained on torchtitan_0_2; export it in that host's environment" in (
        capsys.readouterr().err
    )


def saved_moe_run(folder: Path, route_scale: float = 1.0, expert_bias: bool = False) -> None:
    config = flavor_config("qwen3", "debugmodel_moe", layers=2)
    for layer in config.layers:
        layer.moe.router = dataclasses.replace(layer.moe.router, route_scale=route_scale)
    state = built(config).state_dict()
    if expert_bias:
        state["layers.1.moe.expert_bias_E"] = torch.linspace(-0.1, 0.1, 64)
    dcp.save(state, checkpoint_id=str(folder / "checkpoint" / "step-1"), no_dist=True)
    record = RunRecord(
        "torchtitan_0_3",
        "qwen3",
        "debugmodel_moe",
        as_record(config),
        str(TOKENIZER),
        "checkpoint",
        ["ntp"],
    )
    write_record(folder, record)


def test_moe_routing_transformers_cannot_reproduce_is_refused(tmp_path, capsys):
    saved_moe_run(tmp_path / "scaled", route_scale=2.5)
    saved_moe_run(tmp_path / "biased", expert_bias=True)
    assert main(["export", str(tmp_path / "scaled"), "--out", str(tmp_path / "a")]) == 2
    assert main(["export", str(tmp_path / "biased"), "--out", str(tmp_path / "b")]) == 2
    errors = capsys.readouterr().err
    assert "Qwen3MoE cannot route as this run did (router.route_scale = 2.5)" in errors
    assert "routed with a learned bias (layers.1.moe.expert_bias_E" in errors
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
