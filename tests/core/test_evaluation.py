"""The downstream evaluation: the bundled lm-eval tasks, lm-eval's scores against a plain
PyTorch computation of the same numbers, and the errors before anything is loaded."""

import dataclasses
import json
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
        max_position_embeddings=512,
        **special_token_ids(TOKENIZER),
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, folder / name)
    return folder


def cloze_by_hand(folder: Path, items: list[dict]) -> tuple[float, float]:
    """Perplexity and accuracy of the cloze items, as LAMBADA defines them: the model
    reads BOS + the passage; the target word's tokens are scored (summed log-probability;
    right when every one is the greedy choice)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    log_likelihoods, right = [], []
    for item in items:
        context = [tokenizer.bos_token_id] + tokenizer.encode(item["context"])
        whole = [tokenizer.bos_token_id] + tokenizer.encode(item["context"] + " " + item["target"])
        target = torch.tensor(whole[len(context) :])
        with torch.no_grad():
            logits = model(torch.tensor([whole[:-1]])).logits[0, len(context) - 1 :]
        log_probs = logits.double().log_softmax(-1)
        log_likelihoods.append(log_probs.gather(1, target[:, None]).sum().item())
        right.append(bool((logits.argmax(-1) == target).all()))
    mean = sum(log_likelihoods) / len(log_likelihoods)
    return float(torch.tensor(-mean).exp()), sum(right) / len(right)


def test_lm_eval_scores_the_bundled_tasks_as_the_formula_says(tiny_hf_model, tmp_path):
    evaluation = evaluate(tiny_hf_model, bundled_tasks(), tmp_path / "eval", limit=4)
    written = json.loads(evaluation.results_file.read_text())
    assert evaluation.results_file.parent == tmp_path / "eval"
    found = scores(written)
    assert set(found) == {
        "tangled_tale_cloze/acc",
        "tangled_tale_cloze/perplexity",
        "tangled_tale_perplexity/word_perplexity",
        "tangled_tale_perplexity/byte_perplexity",
        "tangled_tale_perplexity/bits_per_byte",
    }
    items = [json.loads(line) for line in (task_data.TASKS / "cloze.jsonl").open()][:4]
    perplexity, accuracy = cloze_by_hand(tiny_hf_model, items)
    assert found["tangled_tale_cloze/perplexity"] == pytest.approx(perplexity, rel=1e-4)
    assert found["tangled_tale_cloze/acc"] == accuracy
    # A random model over 2,048 tokens: a few bits per byte, not zero, not absurd.
    assert 1.0 < found["tangled_tale_perplexity/bits_per_byte"] < 20.0


def test_an_unknown_task_is_named_before_anything_is_loaded(tmp_path, capsys):
    """The folder does not even exist: the task names are checked first."""
    code = main(["evaluate", str(tmp_path / "missing"), "--tasks", "tangled_tale_clozee"])
    error = capsys.readouterr().err
    assert code == 2
    assert "--tasks tangled_tale_clozee" in error
    assert "tangled_tale_cloze, tangled_tale_perplexity" in error and "lm_eval ls tasks" in error


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
