"""Peak memory and time of the TOP loss (forward + backward), ours against the naive
version with dense targets, side by side in one run.

    python scripts/bench_top.py                  # vocab 32k, 8k tokens, W 1024 (CPU or GPU)

``sparse`` is ``titan_objectives``' path: W (token, probability) pairs per position and the
chunked cross-entropy engine. ``dense`` builds ``[tokens, vocab]`` target scores (-inf
outside the window, as the paper's reference ``seq_to_top`` does), their softmax, the full
logits and ``-sum softmax(y) log_softmax(z)``. Each runs in a fresh process (CPU: peak
resident memory over the inputs; CUDA: ``max_memory_allocated``).
"""

import argparse

import torch
from bench_loss import run_isolated, time_and_peak

from titan_objectives.losses import linear_sparse_cross_entropy_sum
from titan_objectives.objectives.top import top_targets


def sparse_loss(hidden, weight, labels, window, chunk_size):
    ids, probs = top_targets(labels, window)
    return linear_sparse_cross_entropy_sum(hidden, weight, ids, probs, chunk_size)


def dense_loss(hidden, weight, labels, window, chunk_size):
    ids, probs = top_targets(labels, window)
    # The reference's [tokens, vocab] scores: W - d for the window's tokens, -inf elsewhere
    # (entries that are not a first occurrence go to a spare last column, then dropped).
    vocab = weight.shape[0]
    scores = torch.full((*labels.shape, vocab + 1), float("-inf"), device=labels.device)
    distance = torch.arange(1, window + 1, device=labels.device, dtype=torch.float32)
    first = probs > 0
    scores.scatter_(-1, torch.where(first, ids, vocab), (window - distance).expand_as(probs))
    targets = torch.softmax(scores[..., :vocab], dim=-1).nan_to_num(0.0)
    log_p = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    return -(targets * log_p).sum()


PATHS = {"sparse": sparse_loss, "dense": dense_loss}


def measure(path, vocab, hidden_dim, batch, seq, window, chunk_size, device, repeats, queue):
    torch.manual_seed(0)
    hidden = torch.randn(batch, seq, hidden_dim, device=device, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, hidden_dim, device=device)).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    fn = PATHS[path]
    queue.put(
        time_and_peak(
            lambda: fn(hidden, weight, labels, window, chunk_size),
            (hidden, weight),
            device,
            repeats,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"# {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, fp32, "
        f"vocab {args.vocab:,}, hidden {args.hidden}, {args.batch} x {args.seq} tokens, "
        f"W {args.window}, chunk {args.chunk_size}, median of {args.repeats} fwd+bwd"
    )
    print("| path | ms | time vs dense | peak MiB | memory vs dense | loss |")
    print("|---|---|---|---|---|---|")
    results = {
        path: run_isolated(
            measure,
            path,
            args.vocab,
            args.hidden,
            args.batch,
            args.seq,
            args.window,
            args.chunk_size,
            args.device,
            args.repeats,
        )
        for path in ("dense", "sparse")
    }
    dense_time, dense_peak, _ = results["dense"]
    for path, (seconds, peak, loss) in results.items():
        print(
            f"| {path} | {seconds * 1e3:,.0f} | {seconds / dense_time:.2f} | "
            f"{peak / 2**20:,.0f} | {peak / dense_peak:.2f} | {loss:.6g} |"
        )


if __name__ == "__main__":
    main()
