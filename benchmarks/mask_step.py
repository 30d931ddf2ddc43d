"""MFT step cost: FFT step vs MFT step (cached exact top-k, mft_bench.masking) vs MFT "official style" (full sort
of |scores| in every forward, float mask through autograd, no cache), measured side by side in one run.

Each arm runs in its own subprocess on an identically seeded, randomly initialised model of the chosen shape and
the same token batch, so peak memory is that process's own: peak RSS (``ru_maxrss``) on CPU, with the RSS right
after the model was built shown for reference; ``torch.cuda.max_memory_allocated`` on CUDA. On CPU the peak RSS
includes ~0.5 GB of interpreter and libraries (torch, transformers) that every arm pays alike, which the CUDA
number does not; the CPU table therefore also gives the peak above the RSS measured after those imports and
before the model is built, and the peak of live tensors over one extra, profiled step (torch profiler's memory
timeline: parameters, optimizer state, gradients, activations, temporaries; what ``max_memory_allocated``
counts on CUDA, free of the C allocator's retained pages, which RSS includes). Step time is the
median over ``--steps`` timed optimizer steps after ``--warmup`` untimed ones; a step is ``--grad-accum``
micro-batch forward/backward passes plus ``optimizer.step()`` plus (cached MFT arm) the mask refresh.
Mask selection per step: the cached arm times its one top-k refresh after each optimizer step; the official arm
times one full sort of every score matrix and multiplies by the forwards per step (it sorts in each of them).
The cached arm also writes its mask file and reports bits per masked weight (header included).

Precision (``--precision``): ``pure`` (the default) trains the model in ``--dtype`` itself; ``mixed`` is what the
training code does with ``precision: mixed`` (``mft_bench.train.precision``): FFT's weights are cast to an fp32
master copy, MFT's frozen weights stay in ``--dtype`` (its scores are fp32 either way), and each micro-batch's forward
runs under ``torch.autocast`` in ``--dtype`` with the backward outside it, as the Trainer does with ``bf16=True``.
``--checkpointing`` turns on non-reentrant activation checkpointing as the training code does (FFT: the Trainer's
``activation_checkpointing_enable``; MFT: ``mft_bench.train.mft.enable_frozen_checkpointing``). ``--optimizer fused``
is the Trainer's default AdamW (``adamw_torch_fused``); the default is torch's ``AdamW`` as constructed (foreach on
CUDA). Each arm's peak memory and tokens/s are printed beside ``mft_bench.cost``'s figures for the same setting
and, on the LLaMA-2-7B shape, beside the H200 measurements the estimates are checked against (``H200_ANCHORS``).

    python benchmarks/mask_step.py          # SmolLM2-135M shape, CPU, layers 20-23, 4 micro-batches of 2x128 tokens
    python benchmarks/mask_step.py --device cuda --shape llama2-7b --batch 4 --seq-len 512 --grad-accum 4
    python benchmarks/mask_step.py --device cuda --shape llama2-7b --batch 1 --seq-len 2048 --grad-accum 4 \
        --precision mixed --checkpointing --optimizer fused --arms fft,mft

Targets: MFT step <= 0.55x FFT; selection <= 5% of the MFT step; MFT peak memory <= 0.45x FFT (live tensors on
CPU, allocated memory on CUDA); mask file <= 1.01 bits per masked weight.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ARMS = ("fft", "mft", "mft-official")
SHAPES = {
    # SmolLM2-135M: hidden 576, intermediate 1536, 30 layers, 9 heads / 3 kv heads, vocab 49152, tied embeddings
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                      max_position_embeddings=4096),
    # a few-MB Llama for tests of this script
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=512),
}
# Measured on one H200: LLaMA-2-7B shape, band 20-23, 4 x 2048 tokens a step, gradient checkpointing, pure bf16.
# The estimates in mft_bench.cost are checked against these (tests/test_cost.py).
ANCHOR_SETTING = dict(shape="llama2-7b", layers="20-23", tokens_per_step=4 * 2048, checkpointing=True, precision="pure",
                      dtype="bfloat16")
H200_ANCHORS = {"fft": {"peak_gib": 63.0, "tokens_per_s": 9522.0}, "mft": {"peak_gib": 26.0, "tokens_per_s": 18456.0}}
GIB = 2**30


def parse_layers(text: str) -> list[int]:
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(x) for x in text.split(",")]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=dtype)
    return model.train()


class _SortSubnet(torch.autograd.Function):
    """The official code's GetSubnet: full sort of |scores|, float 0/1 mask, gradient passed straight through."""

    @staticmethod
    def forward(ctx, scores_abs, keep_fraction):
        out = torch.empty_like(scores_abs)
        _, idx = scores_abs.flatten().sort()
        j = int((1 - keep_fraction) * scores_abs.numel())
        flat = out.view(-1)
        flat[idx[:j]] = 0
        flat[idx[j:]] = 1
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


def make_official_style(model) -> None:
    """Swap every wrapper's forward for the official composition: sort in each forward, W * float mask, linear."""
    from mft_bench.masking.masked_linear import MaskedLinear, wrappers

    class OfficialStyleMaskedLinear(MaskedLinear):
        def forward(self, x):
            mask = _SortSubnet.apply(self.scores.abs(), 1.0 - self.mask_ratio)
            return F.linear(x, self.weight * mask.to(self.weight.dtype), self.bias)

    for wrapper in wrappers(model).values():
        wrapper.__class__ = OfficialStyleMaskedLinear


def time_official_sorts(model, device: str) -> float:
    from mft_bench.masking.masked_linear import wrappers

    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        for w in wrappers(model).values():
            _SortSubnet.apply(w.scores.abs(), 1.0 - w.mask_ratio)
        sync(device)
    return time.perf_counter() - start


def run_arm(args) -> dict:
    """One arm in this process; returns its measurements."""
    import transformers  # noqa: F401 - imported before the baseline RSS is taken

    from mft_bench.masking import (
        attach_masks,
        current_masks,
        mask_parameters,
        refresh_masks,
        save_masks,
    )
    from mft_bench.recipe import MaskSpec
    from mft_bench.masking.mask_io import base_weights_hash, bits_per_weight

    if args.checkpointing or args.precision == "mixed":
        # imported before the baseline RSS is taken (mft_bench.train brings in the Trainer and peft)
        from mft_bench.train.mft import enable_frozen_checkpointing
        from mft_bench.train.precision import keep_trainable_in_fp32

    device = args.device
    dtype = getattr(torch, args.dtype)
    mixed = args.precision == "mixed"
    libraries_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = build_model(args.shape, device, dtype)
    result: dict = {"arm": args.arm, "libraries_mb": libraries_mb}
    if args.arm == "fft":
        if mixed:
            keep_trainable_in_fp32(model)  # the master copy the optimizer updates
        if args.checkpointing:  # what the Trainer does with activation_checkpointing=True
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        names = attach_masks(model, MaskSpec(layers=parse_layers(args.layers), mask_ratio=args.mask_ratio))
        params = mask_parameters(model)
        result["masked_modules"] = len(names)
        result["masked_weights"] = sum(p.numel() for p in params)
        if args.arm == "mft-official":
            make_official_style(model)
        if args.checkpointing:
            enable_frozen_checkpointing(model)
    result["trainable"] = sum(p.numel() for p in params)
    result["trainable_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    result["checkpointing"] = bool(getattr(model, "is_activation_checkpointing", False))
    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, **({"fused": True} if args.optimizer == "fused"
                                                                         else {}))

    def compute_context():
        """Mixed: the forward under autocast in the model dtype (the Trainer's bf16=True); pure: as built."""
        return torch.autocast(device_type=device, dtype=dtype) if mixed else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq_len), generator=generator)
               .to(device) for _ in range(args.grad_accum)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        result["mem_after_build_mb"] = torch.cuda.memory_allocated() / 2**20
    else:
        result["mem_after_build_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def one_step() -> float:
        """One optimizer step; returns the time of its mask selection (cached MFT arm; else 0)."""
        for ids in batches:
            with compute_context():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss / len(batches)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.arm != "mft":
            return 0.0
        sync(device)  # the one top-k per optimizer step, timed on its own
        t0 = time.perf_counter()
        refresh_masks(model)
        sync(device)
        return time.perf_counter() - t0

    step_times, selection_times = [], []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        selection = one_step()
        sync(device)
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
            selection_times.append(selection)
    result["step_s"] = statistics.median(step_times)
    result["step_times"] = step_times
    result["tokens_per_s"] = args.batch * args.seq_len * len(batches) / result["step_s"]
    if args.arm == "mft":
        result["selection_s"] = statistics.median(selection_times)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            base_weights_hash(model, list(current_masks(model)))
            result["hash_s"] = time.perf_counter() - t0
            path = save_masks(current_masks(model), os.path.join(tmp, "mask.safetensors"), base_model=model)
            result["bits_per_weight"] = bits_per_weight(path)
            result["mask_file_bytes"] = os.path.getsize(path)
    elif args.arm == "mft-official":
        result["selection_s"] = statistics.median(time_official_sorts(model, device) for _ in range(2)) * len(batches)
    if device == "cuda":
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if args.tensor_peak:  # after the RSS peak was read: profiling takes memory of its own
            result["tensor_peak_mb"] = tensor_peak_mb(one_step)
    return result


def tensor_peak_mb(step) -> float | None:
    """Peak of the live CPU tensors (those alive before included) while ``step()`` runs, from the torch profiler's
    memory timeline; None where this torch no longer has it (deprecated in favour of CUDA memory snapshots)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            prof.export_memory_timeline(os.path.join(tmp, "timeline.json"), device="cpu")
        except (AttributeError, NotImplementedError):
            return None
        with open(os.path.join(tmp, "timeline.json")) as f:
            _, sizes = json.load(f)  # [times, [bytes by category] per time]
    return max(sum(point) for point in sizes) / 2**20


def child_command(args, arm: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--arm", arm]
    for key in ("shape", "device", "dtype", "layers", "batch", "seq_len", "grad_accum", "steps", "warmup",
                "mask_ratio", "precision", "optimizer"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    argv += ["--checkpointing"] if args.checkpointing else []
    return argv + ([] if args.tensor_peak else ["--no-tensor-peak"])


def print_table(args, results: list[dict]) -> None:
    fft = next((r for r in results if r["arm"] == "fft"), None)
    mem_kind = "peak CUDA alloc" if args.device == "cuda" else "peak RSS"
    print(f"\nshape {args.shape}, device {args.device}, {args.dtype}, precision {args.precision}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, AdamW {args.optimizer}, layers {args.layers}, "
          f"batch {args.batch}x{args.seq_len} x{args.grad_accum} micro-batches, "
          f"median of {args.steps} steps after {args.warmup} warm-up, threads {torch.get_num_threads()}")
    cpu = args.device == "cpu"
    print(f"{'arm':<14}{'step s':>9}{'x FFT':>8}{'select ms':>11}{'select %':>10}"
          f"{mem_kind + ' MB':>20}{'x FFT':>8}{'after build MB':>16}"
          + (f"{'above libraries MB':>20}{'x FFT':>8}{'tensor peak MB':>16}{'x FFT':>8}" if cpu else ""))
    for r in results:
        ratio = f"{r['step_s'] / fft['step_s']:.2f}" if fft else "-"
        mem_ratio = f"{r['peak_mem_mb'] / fft['peak_mem_mb']:.2f}" if fft else "-"
        sel = r.get("selection_s")
        sel_ms = f"{sel * 1000:.1f}" if sel is not None else "-"
        share = f"{100 * sel / r['step_s']:.1f}" if sel is not None else "-"
        line = (f"{r['arm']:<14}{r['step_s']:>9.3f}{ratio:>8}{sel_ms:>11}{share:>10}"
                f"{r['peak_mem_mb']:>20.0f}{mem_ratio:>8}{r['mem_after_build_mb']:>16.0f}")
        if cpu:
            above = r["peak_mem_mb"] - r["libraries_mb"]
            above_ratio = f"{above / (fft['peak_mem_mb'] - fft['libraries_mb']):.2f}" if fft else "-"
            line += f"{above:>20.0f}{above_ratio:>8}"
            tensors, fft_tensors = r.get("tensor_peak_mb"), fft.get("tensor_peak_mb") if fft else None
            line += f"{tensors:>16.0f}" if tensors else f"{'-':>16}"
            line += f"{tensors / fft_tensors:>8.2f}" if tensors and fft_tensors else f"{'-':>8}"
        print(line)
    mft = next((r for r in results if r["arm"] == "mft"), None)
    if mft:
        print(f"\nmasked: {mft['masked_modules']} matrices, {mft['masked_weights']:,} weights; mask file "
              f"{mft['mask_file_bytes']:,} bytes = {mft['bits_per_weight']:.4f} bits per masked weight "
              f"(target <= 1.01; the official float mask costs 32); base hash {mft['hash_s'] * 1000:.0f} ms")
        share = 100 * mft["selection_s"] / mft["step_s"]
        print(f"selection share of the MFT step: {share:.1f}% (target <= 5%: {'met' if share <= 5 else 'NOT met'})")
    print_anchor_table(args, results)


def estimate_for(args, arm: str):
    """mft_bench.cost's figures for this arm and setting on the machine the script runs on (None: not modelled)."""
    from transformers import LlamaConfig

    from mft_bench.cost import ModelShape, detect_hardware, estimate_training

    if arm not in ("fft", "mft"):
        return None
    tokens_per_step = args.batch * args.seq_len * args.grad_accum
    return estimate_training(
        ModelShape.from_config(LlamaConfig(**SHAPES[args.shape])), arm, tokens_per_step, hardware=detect_hardware(),
        dtype_bytes=torch.finfo(getattr(torch, args.dtype)).bits // 8,
        mask_layers=parse_layers(args.layers) if arm == "mft" else None, gradient_checkpointing=args.checkpointing,
        micro_batch_tokens=args.batch * args.seq_len, seq_len=args.seq_len, tokens_per_step=tokens_per_step,
        master_weights=args.precision == "mixed" and arm == "fft",
    )


def anchor_differences(args) -> list[str]:
    """How this run's setting differs from the one the H200 anchors were measured in."""
    run = dict(shape=args.shape, layers=args.layers, tokens_per_step=args.batch * args.seq_len * args.grad_accum,
               checkpointing=args.checkpointing, precision=args.precision, dtype=args.dtype)
    return [f"{key} {run[key]} (anchors: {value})" for key, value in ANCHOR_SETTING.items() if run[key] != value]


def print_anchor_table(args, results: list[dict]) -> None:
    """Peak memory and tokens/s of each arm beside the estimate for this setting and the H200 anchors."""
    # CPU: live tensors (what max_memory_allocated counts on CUDA), else the RSS above the libraries
    mem_kind = "peak CUDA alloc" if args.device == "cuda" else "CPU live tensors or RSS above libraries"
    differences = anchor_differences(args)
    print(f"\nmeasured ({mem_kind}) vs mft_bench.cost for this setting vs the H200 anchors "
          f"({', '.join(f'{k} {v}' for k, v in ANCHOR_SETTING.items())})")
    if differences:
        print("this run differs from the anchors' setting in: " + "; ".join(differences))
    print(f"{'arm':<14}{'peak GiB':>10}{'estimate':>10}{'x est':>7}{'anchor':>8}{'x anchor':>10}"
          f"{'tokens/s':>11}{'estimate':>10}{'x est':>7}{'anchor':>8}{'x anchor':>10}")
    for r in results:
        est = estimate_for(args, r["arm"])
        anchor = H200_ANCHORS.get(r["arm"]) if args.shape == ANCHOR_SETTING["shape"] else None
        if args.device == "cuda":
            peak = r["peak_mem_mb"] / 1024
        else:
            peak = (r.get("tensor_peak_mb") or r["peak_mem_mb"] - r["libraries_mb"]) / 1024
        est_gib = est.memory_bytes / GIB if est else None
        est_rate = args.batch * args.seq_len * args.grad_accum / est.seconds if est else None

        def cells(value: float, estimate: float | None, reference: float | None, fmt: str) -> str:
            return (f"{format(estimate, fmt) if estimate else '-':>10}{f'{value / estimate:.2f}' if estimate else '-':>7}"
                    f"{format(reference, fmt) if reference else '-':>8}"
                    f"{f'{value / reference:.2f}' if reference else '-':>10}")

        rate_fmt = ".0f" if r["tokens_per_s"] >= 100 else ".2f"
        print(f"{r['arm']:<14}{peak:>10.2f}{cells(peak, est_gib, anchor and anchor['peak_gib'], '.2f')}"
              f"{format(r['tokens_per_s'], rate_fmt):>11}"
              f"{cells(r['tokens_per_s'], est_rate, anchor and anchor['tokens_per_s'], '.0f')}")
        r["estimate"] = {"peak_gib": est_gib, "tokens_per_s": est_rate} if est else None
        r["anchor"] = anchor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--layers", default="20-23", help="band, e.g. 20-23 or 4,5,6,7")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    # 4 micro-batches: selection is per optimizer step, the paper accumulates to 128 sequences per step
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mask-ratio", type=float, default=0.1)
    parser.add_argument("--precision", choices=("pure", "mixed"), default="pure",
                        help="pure: train in --dtype; mixed: FFT weights in fp32, forward under autocast in --dtype")
    parser.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    parser.add_argument("--optimizer", choices=("default", "fused"), default="default",
                        help="AdamW as constructed, or fused (the Trainer's default adamw_torch_fused)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--json", default=None, help="also write all measurements to this file")
    parser.add_argument("--tensor-peak", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU: also profile one extra step for the peak of live tensors (slower)")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.precision == "mixed" and args.dtype not in ("bfloat16", "float16"):
        parser.error(f"--precision mixed computes in --dtype: give bfloat16 or float16, not {args.dtype}")

    if args.arm:
        print(json.dumps(run_arm(args)))
        return
    results = []
    for arm in args.arms.split(","):
        print(f"running arm {arm} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(child_command(args, arm), capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"arm {arm} failed (exit {proc.returncode})")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        # each arm as it finishes: a run stopped at a time limit keeps the arms it measured
        r = results[-1]
        print(f"arm {arm}: step {r['step_s']:.3f} s, {r['tokens_per_s']:.1f} tokens/s, peak {r['peak_mem_mb'] / 1024:.2f} "
              f"GiB, trainable {r['trainable']:,} in {'/'.join(r['trainable_dtypes'])}", flush=True)
        write_json(args, results)
    print_table(args, results)
    write_json(args, results)


def write_json(args, results: list[dict]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
