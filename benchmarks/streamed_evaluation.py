"""Evaluation generation: all items through one ``generate_stream`` call against ``generate`` chunk by chunk.

The evaluation runner used to call the ``hf`` backend once per chunk of ``CHUNK_BATCHES`` x batch-size items (a
chunk's records were written after it); every call ended by draining its batch, its last rows decoding alone.
It now passes all of a benchmark's items to ``generate_stream`` and writes each record as its item finishes,
so waiting items keep the batch full until the very last ones. This script runs both ways on the same backend
and requests, alternated ``--rounds`` times in one process (medians; a shared machine's slow spells then fall
on both), and checks that they produce the same completions.

Workloads as in ``generation_throughput.py``: ``zero-shot`` GSM8K-like word problems, or ``gsm8k-8shot`` (the
evaluation's own prompts; with ``--stops``, its stop strings). CPU, greedy.

    python benchmarks/streamed_evaluation.py [--workload zero-shot|gsm8k-8shot] [--prompts 256] \\
        [--batch-size 32] [--max-new-tokens 64] [--stops] [--rounds R] [--threads N] [--device D]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from generation_throughput import add_workload_arguments, count_tokens, load_workload  # noqa: E402

from mft_bench.evaluation.backends.hf import HFBackend  # noqa: E402
from mft_bench.evaluation.base import GenerationRequest  # noqa: E402
from mft_bench.evaluation.gsm8k import STOP_SEQUENCES  # noqa: E402
from mft_bench.evaluation.runner import CHUNK_BATCHES  # noqa: E402


def chunked(backend: HFBackend, requests: list[GenerationRequest], size: int) -> list[list[str]]:
    """The runner's former way: one ``generate`` call per chunk of ``size`` requests."""
    return [out for start in range(0, len(requests), size) for out in backend.generate(requests[start:start + size])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(parser, prompts=256)
    args = parser.parse_args()
    model, tokenizer, description, prompts, requests = load_workload(args)
    stops = tuple(STOP_SEQUENCES) if args.stops else ()
    backend = HFBackend(model, tokenizer, batch_size=args.batch_size)
    backend.generate(requests[:2])  # warm-up, not timed: packs the decode weights, kept for later calls
    size = CHUNK_BATCHES * args.batch_size

    times: dict[str, list[tuple[float, float]]] = {"chunked": [], "streamed": []}
    outputs = {}
    for _ in range(args.rounds):
        for name, run in (("chunked", lambda: chunked(backend, requests, size)),
                          ("streamed", lambda: backend.generate(requests))):  # one generate_stream, collected
            start, cpu = time.perf_counter(), time.process_time()
            outputs[name] = run()
            times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    tokens = count_tokens(tokenizer, [o[0] for o in outputs["streamed"]])

    print(f"model: {description}")
    print(f"workload: {args.workload}, {len(prompts)} prompts, batch {args.batch_size}, chunks of {size} "
          f"({-(-len(prompts) // size)} calls), max_new_tokens {args.max_new_tokens}, "
          f"stop strings: {list(stops) if stops else 'none'}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {args.rounds} round(s), medians")
    print(f"{'method':<44}{'tokens':>8}{'wall s':>9}{'cpu s':>9}{'tok/cpu-s':>11}")
    medians = {}
    for name, label in (("chunked", f"generate per chunk of {size}"), ("streamed", "one generate_stream")):
        wall, cpu = (statistics.median(t[i] for t in times[name]) for i in range(2))
        medians[name] = cpu
        print(f"{label:<44}{tokens:>8}{wall:>9.1f}{cpu:>9.1f}{tokens / cpu:>11.2f}")
    pairs = [c[1] / s[1] for c, s in zip(times["chunked"], times["streamed"])]
    print(f"streamed speed-up per CPU-second: {medians['chunked'] / medians['streamed']:.2f}x"
          + (f" (rounds: {', '.join(f'{p:.2f}x' for p in pairs)})" if len(pairs) > 1 else ""))
    same = sum(a == b for a, b in zip(outputs["chunked"], outputs["streamed"]))
    print(f"identical completions: {same}/{len(requests)}")


if __name__ == "__main__":
    main()
