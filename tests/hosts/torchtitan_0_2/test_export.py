"""``titan-objectives export`` on torchtitan 0.2.2: a saved model of each exportable
family loads in transformers with the same logits, and every bad argument is named with
nothing left behind. (A trained run's export and evaluation: test_checkpoint_e2e.py.)"""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchtitan.protocols.train_spec import get_train_spec

from tests.export_checks import (
    LOGITS_TOLERANCE,
    TOKENIZER,
    assert_the_check_sees_a_wrong_epsilon_or_rotary_layout,
    assert_transformers_computes,
    verified_difference,
)
from titan_objectives.cli import main
from titan_objectives.hosts.common.run_record import RunRecord, as_record, write_record


def small_moe(args) -> None:
    """debugmodel_moe at two blocks of 8 experts (top 2), its experts in fp32."""
    args.n_layers = 2
    args.moe_args.num_experts, args.moe_args.top_k = 8, 2
    args.moe_args.use_grouped_mm = False


def saved_run(folder: Path, name: str, flavor: str = "debugmodel", step: int = 2, adjust=None):
    """A run folder as training leaves it (record, DCP checkpoint with an objective's
    module in it), from a seeded model whose norm weights are not all ones."""
    spec = get_train_spec(name)
    args = copy.deepcopy(spec.model_args[flavor])
    args.max_seq_len = 64
    if adjust is not None:
        adjust(args)
    torch.manual_seed(0)
    model = spec.model_cls(args)
    with torch.no_grad():
        model.init_weights()
        for key, parameter in model.named_parameters():
            if "norm" in key:
                parameter.uniform_(0.5, 1.5)
    state = {**model.state_dict(), "objectives.nitp.projector.weight": torch.ones(4, 4)}
    dcp.save(state, checkpoint_id=str(folder / "checkpoint" / f"step-{step}"), no_dist=True)
    record = RunRecord(
        "torchtitan_0_2",
        name,
        flavor,
        as_record(args),
        str(TOKENIZER),
        "checkpoint",
        ["ntp", "nitp"],
    )
    write_record(folder, record)
    return model, args


def llama4_experts_in_fp32(args) -> None:
    args.moe_args.use_grouped_mm = False


def llama4_without_rotary_on_blocks_0_and_4(args) -> None:
    llama4_experts_in_fp32(args)
    args.every_n_layers_nope = 4


def llama4_all_moe_top_2(args) -> None:
    """Every block MoE (17bx16e's layout), two experts per token."""
    llama4_experts_in_fp32(args)
    args.interleave_moe_layer_step, args.moe_args.top_k = 1, 2


@pytest.mark.parametrize(
    "name, flavor, adjust",
    [
        ("llama3", "debugmodel", None),
        ("llama4", "debugmodel", llama4_experts_in_fp32),
        ("llama4", "debugmodel", llama4_without_rotary_on_blocks_0_and_4),
        ("llama4", "debugmodel", llama4_all_moe_top_2),
        ("qwen3", "debugmodel", None),
        ("qwen3", "debugmodel_moe", small_moe),
    ],
)
def test_a_saved_model_loads_in_transformers_with_the_same_logits(tmp_path, name, flavor, adjust):
    model, args = saved_run(tmp_path / "run", name, flavor, adjust=adjust)
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    tokens = torch.randint(0, args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens)
    assert_transformers_computes(out, tokens, expected)
    provenance = json.loads((out / "titan_objectives_export.json").read_text())
    assert provenance["step"] == 2 and provenance["objectives_trained"] == ["ntp", "nitp"]
    config = json.loads((out / "config.json").read_text())
    if name == "llama4":
        every_block = args.interleave_moe_layer_step == 1
        assert config["architectures"] == ["Llama4ForCausalLM"]
        assert config["moe_layers"] == ([0, 1, 2, 3, 4, 5] if every_block else [1, 3, 5])
    if flavor == "debugmodel_moe":
        assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["num_experts"] == 8
    elif name == "qwen3":  # tied: transformers ties lm_head to the embedding itself
        assert config["tie_word_embeddings"] is True


def test_moe_routing_transformers_cannot_reproduce_is_refused(tmp_path, capsys):
    def biased_and_scaled(args) -> None:
        small_moe(args)
        args.moe_args.route_scale = 2.5

    saved_run(tmp_path / "scaled", "qwen3", "debugmodel_moe", adjust=biased_and_scaled)
    error = export_error(["export", str(tmp_path / "scaled"), "--out", str(tmp_path / "a")], capsys)
    assert (
        "transformers' Qwen3MoE cannot route as this run did (moe_args.route_scale = 2.5)" in error
    )

    model, _ = saved_run(tmp_path / "biased", "qwen3", "debugmodel_moe", adjust=small_moe)
    state = model.state_dict()
    state["layers.1.moe.expert_bias"] = torch.linspace(-0.1, 0.1, 8)
    dcp.save(state, checkpoint_id=str(tmp_path / "biased" / "checkpoint" / "step-3"), no_dist=True)
    error = export_error(["export", str(tmp_path / "biased"), "--out", str(tmp_path / "b")], capsys)
    assert "routed with a learned bias (layers.1.moe.expert_bias" in error

    def normalized_top_2(args) -> None:
        llama4_experts_in_fp32(args)
        args.moe_args.top_k, args.moe_args.route_norm = 2, True

    saved_run(tmp_path / "normalized", "llama4", adjust=normalized_top_2)
    error = export_error(
        ["export", str(tmp_path / "normalized"), "--out", str(tmp_path / "c")], capsys
    )
    assert "transformers' Llama4 cannot route as this run did (moe_args.route_norm = True)" in error

    def flex_attention(args) -> None:
        llama4_experts_in_fp32(args)
        args.attn_type = "flex"

    saved_run(tmp_path / "flex", "llama4", adjust=flex_attention)
    error = export_error(["export", str(tmp_path / "flex"), "--out", str(tmp_path / "d")], capsys)
    assert "model llama4 with attn_type 'flex': only 'sdpa'" in error

    # torchtitan's own HF save of llama4 (last_save_in_hf) lacks the dense blocks.
    saved_run(tmp_path / "hf_save", "llama4", adjust=llama4_experts_in_fp32)
    (tmp_path / "hf_save" / "checkpoint" / "step-3").mkdir()
    (tmp_path / "hf_save" / "checkpoint" / "step-3" / "model.safetensors").touch()
    error = export_error(
        ["export", str(tmp_path / "hf_save"), "--out", str(tmp_path / "e")], capsys
    )
    assert "saved in Hugging Face format (last_save_in_hf), which cannot be exported for " in error
    assert "leaves the dense blocks' feed-forward out of it; export a DCP checkpoint" in error
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c", "d", "e"))


def test_the_logits_check_catches_a_wrong_norm_epsilon_or_rotary_layout(tmp_path):
    """The check of the export tests fails on either mistake."""
    model, args = saved_run(tmp_path / "run", "llama3")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    tokens = torch.randint(0, args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens)
    unpermuted = model.layers["0"].attention.wq.weight
    assert_the_check_sees_a_wrong_epsilon_or_rotary_layout(
        tmp_path / "hf", tokens, expected, unpermuted
    )


def test_verify_reports_the_agreement(tmp_path, capsys):
    saved_run(tmp_path / "run", "llama3")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--verify"]) == 0
    assert verified_difference(capsys.readouterr().out) < LOGITS_TOLERANCE


def export_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_arguments_are_named_and_nothing_is_left_behind(tmp_path, capsys, monkeypatch):
    run, out = tmp_path / "run", tmp_path / "out" / "hf"
    saved_run(run, "llama3")
    error = export_error(["export", str(run), "--out", str(out), "--step", "7"], capsys)
    assert "--step 7: the run has no checkpoint at that step; it has steps 2" in error
    error = export_error(["export", str(tmp_path), "--out", str(out)], capsys)
    assert "has no titan_objectives_run.json" in error
    error = export_error(["export", str(run), "--out", str(run)], capsys)
    assert f"--out {str(run)!r} exists and is not an empty folder" in error

    # A failure while writing leaves neither the folder nor its staging copy.
    import titan_objectives.hosts.common.hf_export as hf_export

    def disk_full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(hf_export.shutil, "copyfile", disk_full)
    with pytest.raises(OSError, match="No space left"):
        main(["export", str(run), "--out", str(out)])
    assert list((tmp_path / "out").iterdir()) == []


def test_a_moved_run_exports_from_its_last_complete_checkpoint(tmp_path):
    """The record names the checkpoint folder relative to the run: a run copied off the
    machine that trained it exports; a step folder without DCP's ``.metadata`` (a save
    still being written, or cut short) is not a checkpoint."""
    model, args = saved_run(tmp_path / "trained", "llama3")
    shutil.copytree(tmp_path / "trained", tmp_path / "copied")
    shutil.rmtree(tmp_path / "trained")
    (tmp_path / "copied" / "checkpoint" / "step-9").mkdir()
    assert main(["export", str(tmp_path / "copied"), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "titan_objectives_export.json").read_text())["step"] == 2
    tokens = torch.randint(0, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_transformers_computes(tmp_path / "hf", tokens, model(tokens))


def deepseek_run(folder: Path) -> None:
    """A deepseek_v3 run's record and a complete (empty) checkpoint: what the export
    checks before it reads any tensor."""
    record = RunRecord(
        "torchtitan_0_2", "deepseek_v3", "debugmodel", {}, str(TOKENIZER), "checkpoint", ["ntp"]
    )
    write_record(folder, record)
    (folder / "checkpoint" / "step-1").mkdir(parents=True)
    (folder / "checkpoint" / "step-1" / ".metadata").touch()  # complete, as DCP leaves it


def test_a_family_transformers_cannot_represent_is_named(tmp_path, capsys):
    deepseek_run(tmp_path)
    error = export_error(["export", str(tmp_path), "--out", str(tmp_path / "hf")], capsys)
    assert "model 'deepseek_v3' cannot be exported for Hugging Face transformers" in error
    assert "DeepseekV3 routes experts by sigmoid scores only" in error
    assert "exportable models: llama3, llama4, qwen3" in error
    assert not (tmp_path / "hf").exists()


def test_a_runs_export_is_made_once_and_again_after_retraining(tmp_path):
    """``evaluate RUN_DIR`` exports to RUN_DIR/hf/step-N once; a checkpoint rewritten at
    that step (the run trained again) is exported again. Results go to the run."""
    import os

    from titan_objectives.evaluation.runs import model_folder, results_folder

    run = tmp_path / "run"
    model, _ = saved_run(run, "llama3")
    folder = model_folder(run)
    assert folder == run / "hf" / "step-2"
    made = (folder / "model.safetensors").stat().st_mtime_ns
    assert model_folder(run) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == made
    metadata = run / "checkpoint" / "step-2" / ".metadata"
    os.utime(metadata, (metadata.stat().st_atime + 60, metadata.stat().st_mtime + 60))
    assert model_folder(run) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns != made
    assert results_folder(run) == results_folder(folder) == run / "eval"


def test_evaluates_bad_arguments_are_named_before_any_export(tmp_path, capsys):
    """A missing step, ``--step`` with an export, a folder that is neither, and a folder in
    the run's export place that ``evaluate`` did not write: each named, nothing written."""
    run = tmp_path / "run"
    saved_run(run, "llama3")
    tasks = ("--tasks", "tangled_tale_cloze")
    error = export_error(["evaluate", str(run), "--step", "7", *tasks], capsys)
    assert "--step 7: the run has no checkpoint at that step; it has steps 2" in error
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "titan_objectives_run.json"]

    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    error = export_error(["evaluate", str(tmp_path / "hf"), "--step", "2", *tasks], capsys)
    assert "--step 2 applies to a run's dump folder, not to an export" in error
    for folder in (tmp_path / "missing", run / "checkpoint"):
        error = export_error(["evaluate", str(folder), *tasks], capsys)
        assert f"DIR {str(folder)!r} is not an exported model (no config.json, *.safetensors)" in (
            error
        )
    assert not (tmp_path / "missing").exists() and not (run / "checkpoint" / "eval").exists()

    (run / "hf" / "step-2").mkdir(parents=True)
    (run / "hf" / "step-2" / "notes.txt").write_text("mine")
    error = export_error(["evaluate", str(run), *tasks], capsys)
    assert f"{run / 'hf' / 'step-2'} exists but is no export of this run" in error
    assert (run / "hf" / "step-2" / "notes.txt").read_text() == "mine"
    assert not (run / "eval").exists()


def test_a_tokenizer_folder_without_files_is_named_by_where_it_came_from(tmp_path, capsys):
    run = tmp_path / "run"
    saved_run(run, "llama3")
    error = export_error(
        ["export", str(run), "--out", str(tmp_path / "a"), "--tokenizer", str(tmp_path)], capsys
    )
    assert f"--tokenizer {str(tmp_path)!r} has no tokenizer.json or tokenizer.model" in error
    record = json.loads((run / "titan_objectives_run.json").read_text())
    record["tokenizer"] = str(tmp_path / "moved")
    (run / "titan_objectives_run.json").write_text(json.dumps(record))
    error = export_error(["evaluate", str(run), "--tasks", "tangled_tale_cloze"], capsys)
    moved = str(tmp_path / "moved")
    assert f"the run's tokenizer folder (moved since training?) {moved!r} has no" in error
    assert "titan-objectives export RUN_DIR --out DIR --tokenizer TOKENIZER_DIR" in error
    assert not (tmp_path / "a").exists() and not (run / "hf").exists()


def test_compare_checks_every_run_exports_before_the_first_export(tmp_path):
    from titan_objectives.hosts.common.run_record import ExportError
    from titan_objectives.report import downstream_scores

    def normalized_top_2(args) -> None:
        args.moe_args.top_k, args.moe_args.route_norm = 2, True

    saved_run(tmp_path / "llama", "llama3")
    deepseek_run(tmp_path / "deepseek")
    saved_run(tmp_path / "normalized", "llama4", adjust=normalized_top_2)
    for late, refusal in (
        ("deepseek", "model 'deepseek_v3' cannot be exported"),
        ("normalized", r"Llama4 cannot route as this run did \(moe_args.route_norm = True\)"),
    ):
        runs = {"llama": tmp_path / "llama", late: tmp_path / late}
        with pytest.raises(ExportError, match=refusal):
            downstream_scores(runs, ["tangled_tale_cloze"], limit=1)
        assert not (tmp_path / "llama" / "hf").exists()
        assert not (tmp_path / "llama" / "eval").exists()


def test_compare_scores_a_run_whose_export_is_current_without_its_tokenizer(tmp_path):
    """A run exported already needs nothing of the export's sources: a tokenizer folder
    moved since does not stop it."""
    from titan_objectives.report import downstream_scores

    run = tmp_path / "run"
    saved_run(run, "llama3")
    assert main(["evaluate", str(run), "--tasks", "tangled_tale_cloze", "--limit", "1"]) == 0
    record = json.loads((run / "titan_objectives_run.json").read_text())
    record["tokenizer"] = str(tmp_path / "moved")
    (run / "titan_objectives_run.json").write_text(json.dumps(record))
    scores = downstream_scores({"run": run}, ["tangled_tale_cloze"], limit=1)
    assert set(scores["run"]) == {"tangled_tale_cloze/acc", "tangled_tale_cloze/perplexity"}
