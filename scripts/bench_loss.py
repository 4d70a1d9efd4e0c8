"""Peak memory and time of forward + backward of the LM head's cross-entropy, every
backend side by side in one run, with ratios to the plain path: ``plain`` (logits, then
``F.cross_entropy``), ``torch`` (PyTorch's ``F.linear_cross_entropy``, chunked; skipped
where the installed torch lacks it) and ``chunked`` (ours).

    python scripts/bench_loss.py                                   # the GPU sizes
    python scripts/bench_loss.py --vocab 32768 --hidden 512 --tokens 8192 --chunk-size 1024 \
        --dtype float32 --device cpu --repeats 3                   # the CPU size

Each measurement runs in a fresh process, so on CPU the peak resident memory of that
process (over what the inputs already take) is the loss's own peak. On CUDA it is
``max_memory_allocated`` over the inputs.
"""

import argparse
import multiprocessing
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from titan_objectives.losses import linear_cross_entropy_sum, torch_has_linear_cross_entropy


def plain_loss(hidden, weight, labels, chunk_size):
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def torch_loss(hidden, weight, labels, chunk_size):
    return linear_cross_entropy_sum(hidden, weight, labels, chunk_size, backend="torch")


def chunked_loss(hidden, weight, labels, chunk_size):
    return linear_cross_entropy_sum(hidden, weight, labels, chunk_size, backend="chunked")


PATHS = {"plain": plain_loss, "torch": torch_loss, "chunked": chunked_loss}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def time_and_peak(loss_fn, inputs, device: str, repeats: int) -> tuple[float, int, float]:
    """Median seconds of forward + backward of ``loss_fn()`` over ``repeats``, the peak
    memory over what ``inputs`` (tensors whose gradients are cleared after each run)
    already take, and the last loss. On CUDA after a warm-up (kernels, allocator)."""
    cuda = device.startswith("cuda")

    def run_once() -> float:
        loss = loss_fn()
        loss.backward()
        for tensor in inputs:
            tensor.grad = None
        return loss.item()

    if cuda:
        run_once()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = run_once()  # .item() waits for the device
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # The first CPU repeat pays for page faults; report the median of the rest.
    return statistics.median(times[1:] if len(times) > 1 else times), peak, loss


def measure(path, vocab, hidden_dim, tokens, chunk_size, dtype, device, repeats, queue):
    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    hidden = torch.randn(tokens, hidden_dim, dtype=dtype, device=device, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, hidden_dim, device=device)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    fn = PATHS[path]
    seconds, peak, _ = time_and_peak(
        lambda: fn(hidden, weight, labels, chunk_size), (hidden, weight), device, repeats
    )
    queue.put((seconds, peak))


def run_isolated(function, *args):
    """``function(*args, queue)`` in a fresh process; what it puts on the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=function, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    threads = torch.get_num_threads()
    print(
        f"# {device_name} ({threads} threads), torch {torch.__version__}, {args.dtype}, hidden "
        f"{args.hidden}, chunk {args.chunk_size} tokens, median of {args.repeats} fwd+bwd"
    )
    backends = [p for p in PATHS if p != "torch" or torch_has_linear_cross_entropy()]
    if "torch" not in backends:
        print(f"# torch {torch.__version__} has no F.linear_cross_entropy: 'torch' skipped")
    print("| vocab | tokens | backend | ms | time vs plain | peak MiB | memory vs plain |")
    print("|---|---|---|---|---|---|---|")
    for vocab in args.vocab:
        for tokens in args.tokens:
            results = {
                path: run_isolated(
                    measure,
                    path,
                    vocab,
                    args.hidden,
                    tokens,
                    args.chunk_size,
                    args.dtype,
                    args.device,
                    args.repeats,
                )
                for path in backends
            }
            plain_time, plain_peak = results["plain"]
            for path, (seconds, peak) in results.items():
                print(
                    f"| {vocab:,} | {tokens:,} | {path} | {seconds * 1e3:,.0f} | "
                    f"{seconds / plain_time:.2f} | {peak / 2**20:,.0f} | "
                    f"{peak / plain_peak:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
