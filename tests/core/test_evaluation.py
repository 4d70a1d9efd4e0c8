"""The downstream evaluation: the bundled lm-eval tasks, lm-eval's scores against a plain
PyTorch computation of the same numbers, and the errors before anything is loaded."""

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT
from titan_objectives.cli import main
from titan_objectives.evaluation import task_data
from titan_objectives.evaluation.harness import bundled_tasks, evaluate, scores
from titan_objectives.hosts.common.hf_export import special_token_ids
from titan_objectives.hosts.common.run_record import as_record, overlay
from titan_objectives.report import downstream_table

TOKENIZER = ROOT / "assets" / "tokenizer-bpe2k-tiny"


def test_bundled_tasks_are_made_from_text_the_bundled_jobs_never_train_on():
    made = task_data.task_documents(task_data.SOURCE.read_text())
    for name, records in made.items():
        assert (task_data.TASKS / name).read_text() == task_data.jsonl(records), (
            f"{name} is stale: python -m titan_objectives.evaluation.task_data"
        )
    assert len(made["cloze.jsonl"]) >= 100 and len(made["perplexity.jsonl"]) >= 40
    training_text = " ".join((ROOT / "assets" / "tiny" / "train.txt").read_text().split())
    for item in made["cloze.jsonl"]:
        assert item["context"][:80] not in training_text
        assert item["target"].isalpha()
    for document in made["perplexity.jsonl"]:
        passage = " ".join(document["text"].split())
        assert passage[:80] not in training_text and passage[-80:] not in training_text
    assert bundled_tasks() == ["tangled_tale_cloze", "tangled_tale_perplexity"]


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory) -> Path:
    """A small random Llama in the Hugging Face layout, with the bundled tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hf_model")
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,  # a bundled document in one window
        **special_token_ids(TOKENIZER),
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, folder / name)
    return folder


def by_hand(folder: Path, limit: int) -> dict[str, float]:
    """The bundled tasks' numbers in plain PyTorch, as LAMBADA and wikitext define them:
    a cloze passage is read as it is and the target word's tokens are scored (summed
    log-probability; right when every one is the greedy choice); a document is scored
    whole after a BOS token, per word and per byte."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def log_probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)

    cloze_ll, right = [], []
    for item in read_jsonl("cloze.jsonl")[:limit]:
        context = tokenizer.encode(item["context"])
        whole = tokenizer.encode(item["context"] + " " + item["target"])
        target = torch.tensor(whole[len(context) :])
        scored = log_probs(whole)[len(context) - 1 : -1]
        cloze_ll.append(scored.gather(1, target[:, None]).sum().item())
        right.append(bool((scored.argmax(-1) == target).all()))
    rolling_ll, words, nbytes = 0.0, 0, 0
    for document in read_jsonl("perplexity.jsonl")[:limit]:
        tokens = tokenizer.encode(document["text"])
        scored = log_probs([tokenizer.bos_token_id, *tokens])[:-1]
        rolling_ll += scored.gather(1, torch.tensor(tokens)[:, None]).sum().item()
        words += len(re.split(r"\s+", document["text"]))
        nbytes += len(document["text"].encode())
    return {
        "tangled_tale_cloze/perplexity": math.exp(-sum(cloze_ll) / len(cloze_ll)),
        "tangled_tale_cloze/acc": sum(right) / len(right),
        "tangled_tale_perplexity/word_perplexity": math.exp(-rolling_ll / words),
        "tangled_tale_perplexity/byte_perplexity": math.exp(-rolling_ll / nbytes),
        "tangled_tale_perplexity/bits_per_byte": -rolling_ll / nbytes / math.log(2),
    }


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (task_data.TASKS / name).read_text().splitlines()]


def test_lm_eval_scores_the_bundled_tasks_as_the_formula_says(tiny_hf_model, tmp_path):
    evaluation = evaluate(tiny_hf_model, bundled_tasks(), tmp_path / "eval", limit=4)
    assert evaluation.results_file.parent == tmp_path / "eval"
    found = scores(json.loads(evaluation.results_file.read_text()))
    expected = by_hand(tiny_hf_model, limit=4)
    assert set(found) == set(expected)
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, rel=1e-5), key


def test_scores_keep_each_filter_of_a_task():
    results = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.01,
                "exact_match,flexible-extract": 0.5,
            },
            "piqa": {"acc,none": 0.75, "acc_stderr,none": 0.02, "sample_len": 10},
        }
    }
    assert scores(results) == {
        "gsm8k/exact_match,strict-match": 0.25,
        "gsm8k/exact_match,flexible-extract": 0.5,
        "piqa/acc": 0.75,
    }


@pytest.fixture
def nothing_exported(monkeypatch):
    """Makes exporting a run's checkpoint or loading an export fail the test."""
    from titan_objectives.evaluation import harness, runs

    def loaded(*args, **kwargs):
        raise AssertionError("a model was exported or loaded")

    monkeypatch.setattr(runs, "model_folder", loaded)
    monkeypatch.setattr(runs, "check_exports", loaded)
    monkeypatch.setattr(harness, "check_export_folder", loaded)


def test_an_unknown_task_is_named_before_anything_is_loaded(
    tiny_hf_model, nothing_exported, capsys
):
    code = main(
        ["evaluate", str(tiny_hf_model), "--tasks", "tangled_tale_cloze,tangled_tale_clozee"]
    )
    error = capsys.readouterr().err
    assert code == 2
    assert "--tasks tangled_tale_clozee: lm-eval has no such task" in error
    assert "tangled_tale_cloze, tangled_tale_perplexity" in error and "lm_eval ls tasks" in error
    assert not (tiny_hf_model / "eval").exists()


def test_an_empty_task_name_is_named(tmp_path, nothing_exported, capsys):
    assert main(["evaluate", str(tmp_path), "--tasks", "tangled_tale_cloze,,"]) == 2
    error = capsys.readouterr().err
    assert "--tasks 'tangled_tale_cloze,,' has an empty task name" in error


def test_compare_names_an_unknown_task_before_any_export(tmp_path, nothing_exported, capsys):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "run" / "tb")) as writer:
        writer.add_scalar("objectives/ntp/loss", 3.0, 1)
    report = tmp_path / "report"
    argv = ["compare", str(tmp_path / "run"), "--out", str(report), "--evaluate"]
    assert main([*argv, "--tasks", "hellaswagg"]) == 2
    assert "--tasks hellaswagg: lm-eval has no such task" in capsys.readouterr().err
    assert not report.exists()


def test_compare_names_a_run_without_logged_values(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["compare", str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 2
    error = capsys.readouterr().err
    assert f"RUN {str(tmp_path / 'run')!r} holds no TensorBoard event files" in error
    assert not (tmp_path / "report").exists()


def test_bundled_tasks_alone_keep_the_hub_offline():
    """No hub lookups for local files: set before lm-eval's imports read the setting."""
    import os
    import subprocess
    import sys

    code = (
        "from titan_objectives.evaluation.harness import bundled_tasks, task_manager; "
        "task_manager(bundled_tasks()); "
        "import huggingface_hub.constants as hub, datasets.config as data; "
        "print(hub.HF_HUB_OFFLINE, data.HF_HUB_OFFLINE)"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert result.stdout.split() == ["True", "True"], result.stderr[-2000:]


def test_a_folder_that_is_no_export_is_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["evaluate", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"DIR {str(tmp_path)!r} is not an exported model (no *.safetensors)" in error


@dataclasses.dataclass
class Rope:
    theta: float = 10000.0
    init: object = print


@dataclasses.dataclass
class Block:
    heads: int = 4
    rope: Rope = dataclasses.field(default_factory=Rope)


@dataclasses.dataclass
class Model:
    dim: int = 64
    norm_eps: float = 1e-5
    layers: list = dataclasses.field(default_factory=lambda: [Block(), Block()])
    sizes: tuple = (1, 2)


def test_the_run_record_rebuilds_the_trained_arguments():
    trained = Model(dim=256, layers=[Block(8, Rope(5e5, len)), Block(2)], sizes=(3, 4))
    record = json.loads(json.dumps(as_record(trained)))
    rebuilt = overlay(Model(), record)
    assert (rebuilt.dim, rebuilt.sizes) == (256, (3, 4))
    assert [(b.heads, b.rope.theta) for b in rebuilt.layers] == [(8, 5e5), (2, 1e4)]
    assert rebuilt.layers[0].rope.init is print  # callables are recorded as text only
    deeper = overlay(Model(), {"layers": [as_record(Block(1)), as_record(Block(2)), {"heads": 3}]})
    assert [b.heads for b in deeper.layers] == [1, 2, 3]  # the third made like the base's last
    assert [b.heads for b in overlay(Model(), {"layers": [{"heads": 5}]}).layers] == [5]


def test_special_tokens_of_the_bundled_tokenizer():
    assert special_token_ids(TOKENIZER) == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def test_downstream_table_has_one_row_per_run():
    table = downstream_table({"ntp": {"t/acc": 0.25}, "ntp_nitp": {"t/acc": 0.5, "t/ppl": 9.0}})
    assert table.splitlines() == [
        "| run | t/acc | t/ppl |",
        "|---|---|---|",
        "| ntp | 0.25 |  |",
        "| ntp_nitp | 0.5 | 9 |",
    ]
