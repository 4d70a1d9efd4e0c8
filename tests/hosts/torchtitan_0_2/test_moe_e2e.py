"""ntp + nitp + mtp + top on torchtitan's MoE models (CPU, gloo): MTP blocks are the models'
own MoE blocks and their routers are load-balanced (FSDP2, TP and EP equivalence:
test_parallelism_e2e.py)."""

import pytest

from tests.helpers import expert_biases, scalars, train

pytestmark = pytest.mark.slow

STACK = (
    "--objectives.stack",
    "ntp,nitp,mtp,top",
    "--objectives.ntp.chunk_size",
    "64",
    "--objectives.top.window",
    "16",
)
SMALL = ("--training.seq_len", "32", "--training.local_batch_size", "2")
FULL = (
    "--checkpoint.enable",
    "--checkpoint.folder",
    "ckpt",
    "--checkpoint.no-last_save_model_only",
)


EXPERT_PARALLEL = ("--parallelism.expert_parallel_degree", "2")
TENSOR_PARALLEL = ("--parallelism.tensor_parallel_degree", "2")


@pytest.mark.parametrize(
    ("model", "flavor", "mtp_is_moe", "balanced", "nproc", "parallelism"),
    [
        # 2 processes (FSDP2, TP, EP): test_parallelism_e2e.py
        ("deepseek_v3", "debugmodel", True, True, 1, ()),
        # torchtitan 0.2.2 does not balance qwen3
        ("qwen3", "debugmodel_moe", True, False, 2, EXPERT_PARALLEL),
        # Llama4 interleaves MoE every 2nd block; block 7 (the MTP block) is a dense one.
        ("llama4", "debugmodel", False, True, 2, EXPERT_PARALLEL),
        ("llama4", "debugmodel", False, True, 2, TENSOR_PARALLEL),
    ],
)
def test_moe_models_train_the_full_stack(
    tmp_path, model, flavor, mtp_is_moe, balanced, nproc, parallelism
):
    result = train(
        tmp_path,
        *STACK,
        *SMALL,
        *FULL,
        "--model.name",
        model,
        "--model.flavor",
        flavor,
        "--training.steps",
        "2",
        *parallelism,
        nproc=nproc,
    )
    if parallelism:
        assert f"{'ep' if parallelism == EXPERT_PARALLEL else 'tp'}=2" in result.stdout
    tb = scalars(tmp_path)
    for name in ("ntp", "nitp", "mtp", "top"):
        assert sorted(tb[f"objectives/{name}/loss"]) == [1, 2]
    biases = expert_biases(tmp_path / "ckpt" / "step-2")
    mtp = [k for k in biases if k.startswith("objectives.mtp.")]
    assert bool(mtp) == mtp_is_moe, "the MTP block follows the model's own block rule"
    # The MTP router is balanced exactly as the model's own routers are.
    for key, bias in biases.items():
        assert (bias.abs().sum() > 0) == balanced, key
