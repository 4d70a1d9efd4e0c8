"""Hidden states captured under tensor parallelism reach compiled objectives with the
gradient they have in eager mode (2 gloo processes against one)."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

from titan_objectives.hosts.common.capture import sequence_shard
from titan_objectives.sequence import UNSHARDED, SequenceShards

VOCAB, DIM, BATCH, SEQ, WORLD = 16, 4, 2, 8, 2


def embedding_and_data() -> tuple[nn.Embedding, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    embedding = nn.Embedding(VOCAB, DIM)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    weights = torch.randn(BATCH, SEQ, DIM)
    return embedding, tokens, weights


def objective(sequence: SequenceShards):
    """What MTP does with the embedding outputs: shift them by one position, use them."""

    def loss(embedded: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sequence.sum((sequence.shift_left(embedded, 1, 0.0) * weights).sum())

    return loss


def _worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
        sequence = SequenceShards(mesh)
        embedding, tokens, weights = embedding_and_data()
        # torchtitan's plan for the token embedding: vocabulary rows split, output
        # reduce-scattered into sequence shards.
        plan = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
        parallelize_module(embedding, mesh, plan)
        compiled = torch.compile(objective(sequence), backend="aot_eager", dynamic=False)
        loss = compiled(sequence_shard(embedding(tokens)), sequence.local(weights))
        loss.backward()
        results[rank] = (loss.detach(), embedding.weight.grad.full_tensor())
    finally:
        dist.destroy_process_group()


def test_a_compiled_objective_gets_the_vocabulary_parallel_embeddings_gradient():
    embedding, tokens, weights = embedding_and_data()
    expected_loss = objective(UNSHARDED)(embedding(tokens), weights)
    expected_loss.backward()
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(os.path.join(folder, "store"), results), nprocs=WORLD)
        results = dict(results)
    for rank in range(WORLD):
        loss, grad = results[rank]
        torch.testing.assert_close(loss, expected_loss.detach())
        torch.testing.assert_close(grad, embedding.weight.grad)
