"""A fake run folder (run.json, metrics and records of every arm; no model needed) for the report, sweep and
packaging tests: gsm8k (binary) and ifeval (binary prompt-level + fractional instruction-level) scores drawn at
fixed rates, MFT = FFT with 8 more items right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ARMS = ["pretrained", "fft", "mft", "lora", "random_mask", "magnitude_mask"]
GSM8K_RATE = {"pretrained": 0.1, "fft": 0.45, "mft": 0.47, "lora": 0.35, "random_mask": 0.4, "magnitude_mask": 0.3}
N_GSM8K, N_IFEVAL = 300, 60


def scores(rate: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < rate).astype(float)


def write_eval(run_dir: Path, name: str, benchmark: str, primary: str, item_scores: dict[str, np.ndarray]) -> dict:
    folder = run_dir / "stages" / name
    folder.mkdir(parents=True)
    n = len(next(iter(item_scores.values())))
    lines = [json.dumps({"id": f"{benchmark}/{i}", "output": "x",
                         "scores": {m: float(v[i]) for m, v in item_scores.items()}}) for i in range(n)]
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    metrics = {m: {"mean": float(v.mean()), "stderr": float(v.std() / np.sqrt(n))} for m, v in item_scores.items()}
    (folder / "metrics.json").write_text(json.dumps({"benchmark": benchmark, "n": n, "primary_metric": primary,
                                                     "metrics": metrics, "versions": {"prompt": "1"}}))
    return {"metrics": f"stages/{name}/metrics.json", "records": f"stages/{name}/records.jsonl"}


def make_run(run_dir: Path, *, checkpoints: bool = True, paper_key: str | None = "llama2-7b") -> Path:
    """A run folder with gsm8k (binary) and ifeval (binary prompt-level + fractional instruction-level)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    evaluations = []
    fft_gsm = scores(GSM8K_RATE["fft"], N_GSM8K, 1)
    for k, arm in enumerate(ARMS):
        if arm == "mft":  # MFT = FFT plus a few items fixed, so the pairing matters
            gsm = fft_gsm.copy()
            gsm[np.flatnonzero(fft_gsm == 0)[:8]] = 1.0
        elif arm == "fft":
            gsm = fft_gsm
        else:
            gsm = scores(GSM8K_RATE[arm], N_GSM8K, 10 + k)
        rng = np.random.default_rng(100 + k)
        inst = rng.integers(0, 5, size=N_IFEVAL) / 4.0
        prompt = (inst == 1.0).astype(float)
        entry = write_eval(run_dir, f"eval-{arm}-gsm8k", "gsm8k", "exact_match",
                            {"exact_match": gsm, "exact_match_strict": gsm * (rng.random(N_GSM8K) < 0.9)})
        evaluations.append({"arm": arm, "checkpoint": "last", "step": None, "split": "test", "benchmark": "gsm8k",
                            **entry})
        entry = write_eval(run_dir, f"eval-{arm}-ifeval", "ifeval", "prompt_level_strict_acc",
                            {"prompt_level_strict_acc": prompt, "inst_level_strict_acc": inst})
        evaluations.append({"arm": arm, "checkpoint": "last", "step": None, "split": "test", "benchmark": "ifeval",
                            **entry})
    training = []
    if checkpoints:
        # validation scores: fft best at step-20 (tie with last -> earliest wins), mft best at last
        validation = {"fft": {"step-10": 0.30, "step-20": 0.50, "last": 0.50},
                      "mft": {"step-10": 0.30, "step-20": 0.40, "last": 0.55}}
        for arm, by_checkpoint in validation.items():
            for j, (checkpoint, rate) in enumerate(by_checkpoint.items()):
                step = {"step-10": 10, "step-20": 20, "last": 30}[checkpoint]
                val = np.zeros(40)
                val[: int(rate * 40)] = 1.0
                entry = write_eval(run_dir, f"val-{arm}-{checkpoint}", "gsm8k", "exact_match", {"exact_match": val})
                evaluations.append({"arm": arm, "checkpoint": checkpoint, "step": step, "split": "validation",
                                    "benchmark": "gsm8k", **entry})
                if checkpoint != "last":
                    test = scores(0.2 + 0.05 * j, N_GSM8K, 50 + j)
                    entry = write_eval(run_dir, f"test-{arm}-{checkpoint}", "gsm8k", "exact_match",
                                        {"exact_match": test, "exact_match_strict": test})
                    evaluations.append({"arm": arm, "checkpoint": checkpoint, "step": step, "split": "test",
                                        "benchmark": "gsm8k", **entry})
        for arm in ("fft", "mft"):
            folder = run_dir / "stages" / f"{arm}-train"
            folder.mkdir(parents=True)
            history = [{"step": s, "loss": 2.0 / s} for s in range(1, 31)] + [{"step": 30, "eval_loss": 0.5}]
            (folder / "log_history.json").write_text(json.dumps(history))
            training.append({"arm": arm, "log_history": f"stages/{arm}-train/log_history.json"})
    run = {"recipe": "fake", "recipe_hash": "abc", "domain": "math", "backbone": "tiny", "paper_key": paper_key,
           "arms": ARMS, "evaluations": evaluations, "training": training, "masks": {},
           "provenance": {"git_commit": "deadbeef", "packages": {"torch": "2"}, "data_hashes": {"gsm8k": "h"},
                          "prompt_versions": {"gsm8k": "1"}}}
    (run_dir / "run.json").write_text(json.dumps(run))
    return run_dir
