"""Recipes: the validated schema of ``tasks/*.yaml``, loading, ``KEY=VALUE`` overrides and hashing.

A recipe pairs a domain dataset with a backbone and says which arms to train and which benchmarks to run.
Every field has the paper's value as its default where the paper has one (see ``../shared/DESIGN.md``);
unknown keys are refused, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mft_bench import strict_yaml
from mft_bench.arms import ARM_NAMES, ARMS, renamed_arm_message
from mft_bench.data import SourceSpec
from mft_bench.errors import MftBenchError
from mft_bench.seeds import SEED_MAX

# the training length an arm takes from another's settings (arms.Arm.length_from): the compute-matched control trains
# on for exactly MFT's steps, rows and order (MFT's length, FFT's update)
LENGTH_FIELDS = ("epochs", "max_steps", "global_batch_size", "per_device_batch_size", "save_every", "group_by_length")
# keys of earlier recipe versions: the one line that says what replaced them
REMOVED_KEYS = {
    "gradient_accumulation_steps": "replaced by global_batch_size (rows per optimizer step on any number of processes "
                                   "= per_device_batch_size x accumulation x processes; the paper's is 128)",
    "bf16": "removed: training computes in backbone.dtype; set precision: mixed (fp32 master weights, the default) "
            "or pure",
}
# typo guards: far above any real setting, low enough that a slipped exponent is refused instead of training for years
MAX_EPOCHS = 1000
MAX_STEPS = 100_000_000
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
LOSS_REDUCTIONS = ("token", "sequence")
LOCAL, GLOBAL_ABS_EXACT, GLOBAL_SIGNED_THRESHOLD = "local", "global-abs-exact", "global-signed-threshold"
MASK_MODES = (LOCAL, GLOBAL_ABS_EXACT, GLOBAL_SIGNED_THRESHOLD)
# the one line for recipes written when "global" named the exact-count |score| mode alone
AMBIGUOUS_GLOBAL = (
    "'global' is ambiguous: say global-abs-exact (mft-bench's: round(mask_ratio x total) entries of smallest |score| "
    "across the masked matrices, exact count) or global-signed-threshold (the official code's: every entry whose "
    "signed score is below one threshold)"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class BackboneSpec(_Strict):
    name: str = "smollm2-135m"
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DataSpec(_Strict):
    """Training data. ``selection``: ``seeded`` draws each source's ``rows`` with the recipe seed and carves the
    validation rows off the shuffled mixture; ``official`` takes the rows the official MFT code trains on (each
    source ``shuffle(seed=42).select(range(rows))`` with ``datasets``) and the validation rows from beyond them.
    ``chat_template``: ``tokenizer`` formats with the tokenizer's own template (Tulu's when it has none);
    ``tulu`` with the official code's Tulu template for every backbone (``mft_bench.data.formatting``)."""

    sources: list[SourceSpec] = Field(min_length=1)
    validation_rows: int = Field(default=32, ge=1)
    max_length: int = Field(default=1024, ge=8)
    data_dir: str | None = None
    selection: Literal["seeded", "official"] = "seeded"
    chat_template: Literal["tokenizer", "tulu"] = "tokenizer"

    @model_validator(mode="after")
    def _validation_leaves_training_rows(self) -> "DataSpec":
        rows = [source.rows for source in self.sources]
        if None not in rows and self.validation_rows >= sum(rows):
            raise ValueError(f"validation_rows {self.validation_rows} leaves no training row: the sources give "
                             f"{sum(rows)} rows; lower validation_rows or add rows")
        return self


class TrainSpec(_Strict):
    """Hyperparameters of one training arm; defaults are the paper's (LLaMA2-7B: 8 GPUs x 1 x 16 = 128 rows a step).

    ``global_batch_size`` is the rows of one optimizer step across every process; the accumulation is derived from
    it, ``per_device_batch_size`` and the number of processes, so a recipe trains the same on 1 GPU or 8.
    ``precision``: ``mixed`` keeps the trained weights in fp32 and computes in ``backbone.dtype`` (autocast), as the
    official code's DeepSpeed bf16 did; ``pure`` trains the weights in ``backbone.dtype`` itself (bf16 AdamW at lr
    2e-5 loses most updates: a step is below half a bf16 ulp for |w| ~ 0.02).
    ``strategy``: how the arm spreads over processes: ``ddp`` replicates the model, ``fsdp`` shards weights,
    gradients and optimizer state (FFT only), ``auto`` shards FFT only when a replica would not fit a GPU.
    ``loss_reduction``: ``token`` averages the loss over every labelled token of an optimizer step; ``sequence``
    averages each sequence's own token mean over the step's sequences (the official code's micro-batch-1 loss).
    """

    epochs: float = Field(default=2.0, gt=0, le=MAX_EPOCHS)
    max_steps: int = Field(default=-1, ge=-1, le=MAX_STEPS)  # > 0 overrides epochs
    learning_rate: float = Field(default=2e-5, gt=0)
    lr_scheduler: Literal[SCHEDULERS] = "linear"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    global_batch_size: int = Field(default=128, ge=1)
    per_device_batch_size: int = Field(default=1, ge=1)
    max_grad_norm: float = Field(default=1.0, ge=0)
    gradient_checkpointing: bool = False
    precision: Literal["mixed", "pure"] = "mixed"
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    save_every: float | None = Field(default=None, gt=0)  # fraction of an epoch between exports (paper: 1/3)
    resume_every_steps: int | None = Field(default=None, ge=1)  # optimizer steps between resume checkpoints
    group_by_length: bool = True
    loss_reduction: Literal[LOSS_REDUCTIONS] = "token"

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (train for epochs) or a positive step count, got 0")
        return value

    @property
    def export_count(self) -> int:
        """Evaluable exports the arm writes: one every ``save_every`` epochs, evenly spaced, the last at the end
        (the paper's 1/3 over 2 epochs: 6); 1 (the end) without ``save_every``. Known before training."""
        return 1 if self.save_every is None else max(1, round(self.epochs / self.save_every))

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainSpec":
        if self.save_every is not None and self.max_steps > 0:
            raise ValueError("save_every is a fraction of the epochs trained; with max_steps leave it null")
        if self.save_every is not None and self.save_every > max(self.epochs, 1.0):
            raise ValueError(f"save_every is a fraction of an epoch (paper: 0.3333), got {self.save_every} for "
                             f"{self.epochs:g} epoch(s); use at most the epochs trained, or null for the end only")
        if self.global_batch_size % self.per_device_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of per_device_batch_size "
                f"{self.per_device_batch_size}"
            )
        return self

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each of ``world_size`` processes; refuses a batch it cannot make."""
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            raise MftBenchError(
                f"global_batch_size {self.global_batch_size} cannot be split into per_device_batch_size "
                f"{self.per_device_batch_size} x {world_size} process(es): choose a global batch that is a multiple "
                f"of {per_step}, or another per-device batch or process count"
            )
        return self.global_batch_size // per_step


class LoraSpec(TrainSpec):
    """The LoRA arm: training settings plus the adapters'; defaults are the paper's LoRA baseline (r 64, alpha 16,
    dropout 0.1). ``target_modules`` null: the 7 projections when the model has them, else every linear layer."""

    r: int = Field(default=64, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    target_modules: list[str] | None = Field(default=None, min_length=1)


class MaskSpec(_Strict):
    """Which linear modules the masks of MFT and of its baselines cover, and how (``mft_bench.masking``).

    ``layers``: decoder layer indices (kept sorted). ``modules``: projection names, null for the architecture's
    default projections (``masking/architectures.py``). ``mask_ratio`` is the REMOVED fraction (the official
    config's ``sparsity 0.9`` means keep 90%, i.e. 0.1 here). ``mode``: ``local`` (the paper's) removes
    ``round(mask_ratio * numel)`` entries of smallest |score| per matrix; ``global-abs-exact`` removes
    ``round(mask_ratio * total)`` entries of smallest |score| across all masked matrices together (exact count,
    mft-bench's); ``global-signed-threshold`` is the official code's global mode (``SupermaskLinearThreshold``):
    an entry is removed while its SIGNED score is below ``threshold``, a constant for the whole run, so the removed
    count follows the scores; ``threshold`` null there takes the official ``percentile`` helper of all initial
    scores at ``mask_ratio`` (about that fraction removed at the start). The scores' random initialisation takes
    the recipe's seed, passed beside the spec.

    ``start_from``: the FFT checkpoint MFT and the mask baselines start from: ``last``, ``best-val`` (best on the
    validation split of the first benchmark that has one, else lowest validation loss), ``best-test`` (best on the
    first benchmark's test split: the paper's protocol, optimistic) or ``step-N``."""

    layers: list[int] = Field(min_length=1)
    modules: list[str] | None = Field(default=None, min_length=1)
    mask_ratio: float = 0.1
    init: Literal["normal", "magnitude"] = "normal"
    mode: Literal[MASK_MODES] = LOCAL
    threshold: float | None = None
    start_from: str = Field(default="last", pattern=r"^(last|best-val|best-test|step-[1-9][0-9]*)$")

    @field_validator("mode", mode="before")
    @classmethod
    def _mode_named_exactly(cls, value: Any) -> Any:
        if value == "global":
            raise ValueError(AMBIGUOUS_GLOBAL)
        return value

    @model_validator(mode="after")
    def _threshold_with_its_mode(self) -> "MaskSpec":
        if self.threshold is not None and self.mode != GLOBAL_SIGNED_THRESHOLD:
            raise ValueError(f"threshold applies to mode global-signed-threshold only (mode is {self.mode}): remove "
                             "it, or set that mode")
        return self

    @field_validator("mask_ratio")
    @classmethod
    def _ratio_in_open_interval(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(f"must be in (0, 1) (the REMOVED fraction), got {value}")
        return value

    @field_validator("layers")
    @classmethod
    def _layers_non_negative(cls, value: list[int]) -> list[int]:
        if any(layer < 0 for layer in value):
            raise ValueError(f"layer indices must be >= 0, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"layer indices repeat: {value}")
        return sorted(value)


class BenchmarkSpec(_Strict):
    name: str
    limit: int | None = Field(default=None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_benchmark(cls, value: str) -> str:
        from mft_bench.evaluation.registry import validate_benchmark_name

        try:
            validate_benchmark_name(value)
        except MftBenchError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _known_options(self) -> "BenchmarkSpec":
        from mft_bench.evaluation.options import validate_options

        try:
            validate_options(self.name, self.options)
        except MftBenchError as exc:
            raise ValueError(str(exc)) from None
        return self


class EvaluationSpec(_Strict):
    """``checkpoints: all`` also evaluates every intermediate export of the training arms (their ``save_every``);
    the report then adds rows of the checkpoint chosen on the validation split (``@val``) and, with
    ``test_selected``, of the one best on the test benchmark itself (``@test``: the paper's protocol, optimistic,
    labelled wherever it is shown, never the headline)."""

    backend: Literal["hf", "vllm"] = "hf"
    batch_size: int = Field(default=32, ge=1)
    checkpoints: Literal["last", "all"] = "last"
    test_selected: bool = False
    # each evaluation in a process of its own, on the model's saved folder (default: with vllm, whose engine must
    # start after training gave the GPU back, and never share a process with another engine)
    fresh_process: bool | None = None
    benchmarks: list[BenchmarkSpec] = Field(min_length=1)
    sandbox: Literal["namespace", "rlimits"] = "namespace"  # weakest code-sandbox isolation accepted

    @model_validator(mode="after")
    def _benchmarks_unique(self) -> "EvaluationSpec":
        seen: dict[str, int] = {}
        for index, bench in enumerate(self.benchmarks):
            if bench.name in seen:
                first = self.benchmarks[seen[bench.name]]
                same = first.options == bench.options and first.limit == bench.limit
                why = "remove one" if same else "results are kept per benchmark name: evaluate the other settings " \
                                                "in a recipe of their own"
                raise ValueError(f"benchmarks {seen[bench.name]} and {index} are both {bench.name}"
                                 f"{'' if same else ' (with different settings)'}: {why}")
            seen[bench.name] = index
        return self

    @property
    def in_fresh_process(self) -> bool:
        return self.backend == "vllm" if self.fresh_process is None else self.fresh_process


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    description: str = ""
    domain: Literal["math", "coding", "instruction"] | None = None
    paper_key: str | None = None
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    data: DataSpec
    arms: list[str] = Field(default_factory=lambda: list(ARM_NAMES), min_length=1)
    mask: MaskSpec
    fft: TrainSpec = Field(default_factory=TrainSpec)
    mft: TrainSpec = Field(default_factory=TrainSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    evaluation: EvaluationSpec
    output_dir: str | None = None

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_in_range(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value <= SEED_MAX:
            raise ValueError(f"must be an integer from 0 to {SEED_MAX} (numpy's seed range), got {value:g}")
        return value

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, value: list[str]) -> list[str]:
        for name in value:
            renamed = renamed_arm_message(name)
            if renamed:
                raise ValueError(renamed)
            if name not in ARMS:
                raise ValueError(f"unknown arm '{name}'; arms are {', '.join(ARM_NAMES)}")
        return value

    @model_validator(mode="after")
    def _arms_consistent(self) -> "Recipe":
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms repeat: {self.arms}")
        needing = [arm for arm in self.arms if ARMS[arm].needs_fft]
        if needing and "fft" not in self.arms:
            raise ValueError(f"arms {needing} start from the FFT model: add 'fft' to arms")
        start = self.mask.start_from
        if start.startswith("best") and self.evaluation.checkpoints != "all":
            raise ValueError(f"mask.start_from {start} chooses among FFT checkpoints: set evaluation.checkpoints: all "
                             "(and fft.save_every)")
        matched = [arm for arm in self.arms if ARMS[arm].matches_mft_counts]
        if self.mask.mode != "local" and matched and "mft" not in self.arms:
            raise ValueError(f"arms {matched} in mask.mode {self.mask.mode} remove per matrix what MFT's mask removed: "
                             "add 'mft' to arms (or use mode local)")
        if start == "best-test" and not self.evaluation.test_selected:
            raise ValueError("mask.start_from best-test selects on the test benchmark: set "
                             "evaluation.test_selected: true so the report labels it")
        if self.evaluation.test_selected and self.evaluation.checkpoints != "all":
            raise ValueError("evaluation.test_selected picks among checkpoints: set evaluation.checkpoints: all")
        for arm in (a.name for a in ARMS.values() if a.replicated):
            if getattr(self, ARMS[arm].settings).strategy == "fsdp":
                raise ValueError(
                    f"{arm}.strategy fsdp: the {arm} arm reads whole weights on every process (masks / merged "
                    "adapters); use ddp or auto (only fft shards)"
                )
        if self.backbone.dtype == "float16" and any(getattr(self, a).precision == "pure" for a in ("fft", "mft", "lora")):
            raise ValueError("precision pure with backbone.dtype float16: fp16 weights cannot be trained without an "
                             "fp32 master copy; use precision mixed or bfloat16")
        return self

    def train_spec(self, arm: str) -> TrainSpec:
        """The training settings of a trained arm. ``fft_continued``, the compute-matched control of MFT, keeps
        training the FFT model MFT starts from with FFT's settings (learning rate, schedule shape, precision) for
        MFT's length: the same optimizer steps on the same rows in the same order (the row order is a function of
        the seed and the global batch)."""
        entry = ARMS.get(arm)
        if entry is None or not entry.trained:
            raise ValueError(f"{arm} has no training stage")
        spec = getattr(self, entry.settings)
        if entry.length_from:
            length = getattr(self, entry.length_from)
            spec = spec.model_copy(update={name: getattr(length, name) for name in LENGTH_FIELDS})
        return spec

    def content_hash(self) -> str:
        return stable_hash(self.model_dump(mode="json"))


def stable_hash(value: Any, length: int = 12) -> str:
    """Short sha256 of a JSON-serialisable value (sorted keys), for content-addressed stage folders."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _format_location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _first_error_line(exc: ValidationError, source: str) -> str:
    error = exc.errors()[0]
    field = _format_location(error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        removed = REMOVED_KEYS.get(str(error["loc"][-1]))
        if removed:
            return f"{source}: '{field}' was {removed}"
        return f"{source}: unknown key '{field}'"
    if kind == "missing":
        return f"{source}: missing required key '{field}'"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    suffix = f" (got {got!r})" if kind not in ("value_error",) and not isinstance(got, (dict, list)) else ""
    return f"{source}: {field}: {message}{suffix}"


_EXPONENT_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (["a","b","c"], value parsed as YAML, so numbers, lists and booleans work)."""
    if "=" not in text:
        raise MftBenchError(f"override '{text}' is not KEY=VALUE (e.g. fft.learning_rate=1e-5)")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise MftBenchError(f"override '{text}' has an empty key")
    try:
        value = strict_yaml.load(raw, f"override '{text}'") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _EXPONENT_NUMBER.match(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-5" as a string; on a command line it means the number
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set nested keys in the raw recipe mapping. List items are addressed by index (``data.sources.0.rows``)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise MftBenchError(f"override '{text}': no list item {part} at '{'.'.join(path[:depth + 1])}'")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise MftBenchError(f"override '{text}': '{'.'.join(path[:depth + 1])}' is not a mapping")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise MftBenchError(f"override '{text}': no list item {last}")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def validate_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise MftBenchError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise MftBenchError(_first_error_line(exc, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Every problem is an MftBenchError with one line."""
    path = Path(path)
    if not path.is_file():
        raise MftBenchError(f"recipe file not found: {path}")
    try:
        data = strict_yaml.load(strict_yaml.decode(path.read_bytes(), str(path)), str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MftBenchError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        raise MftBenchError(f"{path}: the recipe file is empty")
    if isinstance(data, dict) and "sweep" in data:
        raise MftBenchError(f"{path} is a sweep file: run it with 'mft-bench sweep {path}'")
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    return validate_recipe(data, source=str(path))


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
