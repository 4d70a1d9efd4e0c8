"""The objectives inside a real torchtitan model (llama3 debug flavor, CPU)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torchtitan.models.llama3 import llama3_args
from torchtitan.models.llama3.model.model import TransformerBlock

from tests.hosts.torchtitan_0_2.building import llama3_with_objectives
from titan_objectives import Features
from titan_objectives.hosts.common.capture import HiddenStateTap
from titan_objectives.hosts.torchtitan_0_2.model_adapter import LAYOUT, documents_by_eos
from titan_objectives.objectives import MTPOptions, NITPOptions, NTPOptions
from titan_objectives.sequence import UNSHARDED

SEQ = 16


def build(options, flavor="debugmodel", eos_id=None):
    args = copy.deepcopy(llama3_args[flavor])
    args.max_seq_len = SEQ
    torch.manual_seed(0)
    model = llama3_with_objectives(args, options)
    with torch.no_grad():
        model.init_weights()
    tap = HiddenStateTap(
        model, LAYOUT, model.objectives.requirements(), documents_by_eos(args, eos_id)
    )
    tokens = torch.randint(0, args.vocab_size, (2, SEQ))
    labels = torch.roll(tokens, -1, dims=1)
    return model, tap, tokens, labels


def test_mtp_blocks_are_the_models_own_and_head_and_embedding_are_shared():
    model, tap, tokens, labels = build({"ntp": NTPOptions(), "mtp": MTPOptions(depth=2)})
    mtp = model.objectives["mtp"]
    assert all(type(module.block) is TransformerBlock for module in mtp.depths)
    assert mtp.shared.output_weight() is model.output.weight

    # One parameter per tensor: nothing duplicated for the optimizer or checkpoints.
    params = list(model.parameters())
    assert len({p.data_ptr() for p in params}) == len(params)
    names = [name for name, _ in model.named_parameters()]
    assert names.count("output.weight") == 1 and names.count("tok_embeddings.weight") == 1
    assert sum("objectives.mtp.depths.1.block.attention." in n for n in names) == 4

    # The MTP term alone trains the shared embedding and output head.
    with tap.capture() as captured:
        model(tokens)
    mtp(Features(labels=labels, layers=captured.hidden)).loss_sum.backward()
    assert model.output.weight.grad.abs().sum() > 0
    assert model.tok_embeddings.weight.grad.abs().sum() > 0
    assert model.layers["0"].attention.wq.weight.grad.abs().sum() > 0


def test_blocks_are_initialized_like_the_models_deeper_blocks():
    model, *_ = build({"ntp": NTPOptions(), "mtp": MTPOptions(depth=1)})
    block = model.objectives["mtp"].depths[0].block
    assert block.weight_init_std == pytest.approx(0.02 / (2 * (6 + 1)) ** 0.5)
    assert block.attention.wq.weight.std() > 0


def test_logits_are_skipped_only_when_nobody_reads_them():
    model, tap, tokens, _ = build({"ntp": NTPOptions(chunk_size=8), "nitp": NITPOptions()})
    with tap.capture() as captured:
        skipped = model(tokens)
    assert skipped.shape == (2, 0, 2048)
    assert captured.hidden["final"].shape == (2, SEQ, 256)
    assert model(tokens).shape == (2, SEQ, 2048)  # validation and other callers

    model, tap, tokens, _ = build({"ntp": NTPOptions(), "nitp": NITPOptions()})
    with tap.capture():
        assert model(tokens).shape == (2, SEQ, 2048)


def test_chunked_ntp_equals_plain_ntp_in_the_model():
    plain, tap, tokens, labels = build({"ntp": NTPOptions()})
    chunked, chunked_tap, *_ = build({"ntp": NTPOptions(chunk_size=5)})
    with tap.capture():
        logits = plain(tokens)
    expected = plain.objectives["ntp"](Features(labels=labels, logits=logits)).loss_sum
    with chunked_tap.capture() as captured:
        chunked(tokens)
    final = captured.hidden["final"]
    got = chunked.objectives["ntp"](Features(labels=labels, final_hidden=final)).loss_sum
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    expected.backward()
    got.backward()
    for name, param in plain.named_parameters():
        other = dict(chunked.named_parameters())[name]
        torch.testing.assert_close(other.grad, param.grad, rtol=1e-4, atol=1e-6)


def test_capture_records_the_masks_and_documents_of_block_causal_attention():
    """Flex attention runs forward on CPU: the capture holds the masks the trunk ran with
    (MTP's blocks need them) and each position's document, EOS ending a document."""
    eos = 7
    model, tap, tokens, labels = build(
        {"ntp": NTPOptions(), "mtp": MTPOptions()}, flavor="debugmodel_flex_attn", eos_id=eos
    )
    tokens[tokens == eos] = eos + 1
    tokens[0, [3, 9]] = eos
    masks = model.get_attention_masks(tokens, SimpleNamespace(eos_id=eos))
    with torch.no_grad(), tap.capture() as captured:  # no flex backward on CPU
        model(tokens, attention_masks=masks)
    assert captured.context["attention_masks"] is masks
    expected = [[0] * 4 + [1] * 6 + [2] * (SEQ - 10), [0] * SEQ]
    assert captured.documents.tolist() == expected
    features = captured.features(labels, None, UNSHARDED)
    assert features.documents is captured.documents
    # MTP's block runs with the trunk's masks (flex attention refuses to run without).
    mtp = model.objectives["mtp"]
    with torch.no_grad():
        assert torch.isfinite(mtp(features.restricted_to(mtp.requirements())).loss_sum)
