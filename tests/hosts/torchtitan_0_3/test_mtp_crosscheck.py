"""Our ``mtp`` (deepseek variant) against torchtitan 0.3's own DeepSeek-V3 MTP on
identical weights and data: per-depth losses and the total, fp32."""

import pytest
import torch
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss
from torchtitan.models.deepseek_v3 import model_registry
from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_debugmodel
from torchtitan.models.deepseek_v3.mtp import MTPLoss, roll_mtp_sequence

from tests.helpers import stack_of
from titan_objectives.hosts.common.capture import HiddenStateTap
from titan_objectives.hosts.torchtitan_0_3.model_adapter import (
    LAYOUT,
    DecoderSharedModules,
    documents_by_position,
    model_info,
)
from titan_objectives.objectives import MTPOptions, NTPOptions
from titan_objectives.sequence import UNSHARDED

SEQ = 32


def build(num_mtp_layers: int):
    trainer_config = deepseek_v3_debugmodel()
    trainer_config.training.seq_len = SEQ
    config = model_registry("debugmodel", num_mtp_layers=num_mtp_layers).model
    config.update_from_config(config=trainer_config)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model, config


def packed_batch(vocab: int):
    """Two rows of packed documents (positions restart at each document)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, SEQ), generator=generator)
    labels = torch.randint(0, vocab, (2, SEQ), generator=generator)
    positions = torch.stack([torch.cat([torch.arange(20), torch.arange(12)]), torch.arange(SEQ)])
    return tokens, labels, positions


@pytest.mark.parametrize("depth", [1, 2])
def test_deepseek_mtp_reproduces_torchtitan_0_3_mtp_loss(depth):
    torch.manual_seed(0)
    theirs, _ = build(depth)
    # Non-trivial norm weights, so that a swapped norm would show. One difference by
    # design: depth k+1 reads depth k's block output before its final norm (ours) or
    # after it (torchtitan's); the two agree while that norm's weight is 1, as initialized,
    # so only the last depth's final norm gets other weights.
    with torch.no_grad():
        for k, layer in enumerate(theirs.mtp_layers, start=1):
            norms = (layer.enorm, layer.hnorm) + ((layer.mtp_norm,) if k == depth else ())
            for norm in norms:
                norm.weight.uniform_(0.5, 1.5)
    tokens, labels, positions = packed_batch(theirs.config.vocab_size)
    masks = theirs.get_attention_masks(positions=positions)
    tokens_count = torch.tensor(labels.numel())
    with torch.no_grad():
        predictions = theirs(tokens, positions=positions, attention_masks=masks)
        their_total, _ = MTPLoss.Config().build()(
            predictions, labels, tokens_count, positions=positions
        )
    their_depths = [
        cross_entropy_loss(
            predictions[k],
            roll_mtp_sequence(labels, shift=k, fill_value=IGNORE_INDEX, positions=positions),
        )
        for k in range(1, depth + 1)
    ]

    trunk, config = build(0)
    trunk.load_state_dict(
        {k: v for k, v in theirs.state_dict().items() if not k.startswith("mtp_layers.")}
    )
    shared = DecoderSharedModules(config)
    shared.bind(trunk)
    ours = stack_of(
        {"ntp": NTPOptions(), "mtp": MTPOptions(depth=depth)}, model_info(config, SEQ, shared)
    )
    dim = config.dim
    for module, layer in zip(ours["mtp"].depths, theirs.mtp_layers, strict=True):
        block_state = {
            k: v
            for k, v in layer.state_dict().items()
            if k.split(".")[0] not in ("enorm", "hnorm", "eh_proj", "mtp_norm")
        }
        module.block.load_state_dict(block_state)
        with torch.no_grad():
            module.embedding_norm.weight.copy_(layer.enorm.weight)
            module.hidden_norm.weight.copy_(layer.hnorm.weight)
            module.norm.weight.copy_(layer.mtp_norm.weight)
            # theirs: [embedding, hidden] -> d; ours: [hidden, embedding] -> d
            weight = layer.eh_proj.weight
            module.projection.weight.copy_(torch.cat([weight[:, dim:], weight[:, :dim]], 1))
    tap = HiddenStateTap(trunk, LAYOUT, ours.requirements(), documents_by_position)
    with torch.no_grad(), tap.capture() as captured:
        logits = trunk(tokens, positions=positions, attention_masks=masks)
        output = ours(captured.features(labels, logits, UNSHARDED))

    mtp = output.outputs["mtp"]
    for k, theirs_k in enumerate(their_depths, start=1):
        metric = mtp.metrics[f"depth_{k}"]
        torch.testing.assert_close(metric.total, theirs_k, rtol=1e-5, atol=0, msg=f"depth {k}")
    torch.testing.assert_close(
        output.outputs["ntp"].loss_sum,
        cross_entropy_loss(predictions[0], labels),
        rtol=1e-5,
        atol=0,
    )
    torch.testing.assert_close(
        output.weighted_loss_sum / tokens_count, their_total, rtol=1e-5, atol=0
    )
