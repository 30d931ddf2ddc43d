"""The vLLM backend on our side of vLLM's API: the prompt token ids both backends build (chat and plain formats,
one BOS, the same truncation), the engine's options, sampling parameters, seeds, stop handling and teardown.

vLLM cannot be installed here (no GPU); a minimal stand-in ``vllm`` module in ``sys.modules`` records what
``LLM(...)`` and ``generate(...)`` receive: ``inputs.TokensPrompt`` (a TypedDict in vLLM, so a dict at run time),
``SamplingParams``, ``LLM`` and ``distributed.parallel_state``'s two teardown functions.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import processors

from mft_bench.backbone import byte_tokenizer, embedded_gguf_path, tiny_model
from mft_bench.errors import MftBenchError
from mft_bench.evaluation import runner
from mft_bench.evaluation.backends import make_backend
from mft_bench.evaluation.backends.hf import HFBackend
from mft_bench.evaluation.backends.token_ids import prompt_token_ids
from mft_bench.evaluation.backends.vllm import VLLMBackend, request_seed
from mft_bench.evaluation.base import GenerationRequest

# Llama-3's chat template in shape: it writes the BOS itself.
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
FAKE_TAIL = "\nrest"  # every fake completion ends with it: a request stopping at "\n" must not see it


def llama3_style_tokenizer():
    """The byte tokenizer made LLaMA-like: plain text gets a BOS, the chat template writes its own."""
    tokenizer = byte_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_token_id)])
    tokenizer.chat_template = LLAMA3_STYLE_TEMPLATE
    return tokenizer


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module", params=["byte", "llama3_style", "smollm2"])
def checkpoint(request, tmp_path_factory):
    """(folder, model, tokenizer): a tiny model over the tokenizer, saved as an exported arm is (model and tokenizer
    files in one folder); the in-memory model and tokenizer are what the hf backend gets."""
    tokenizer = {"byte": byte_tokenizer, "llama3_style": llama3_style_tokenizer, "smollm2": smollm2_tokenizer}[
        request.param]()
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=1).eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture
def fake_vllm(monkeypatch):
    """Install the stand-in ``vllm`` (and claim a CUDA device); returns the log of engines and teardown steps."""
    log = types.SimpleNamespace(engines=[], teardown=[])

    class TokensPrompt(dict):
        pass

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs, self.calls = kwargs, []
            log.engines.append(self)

        def generate(self, prompts, sampling_params, use_tqdm=True):
            self.calls.append((prompts, sampling_params))
            return [types.SimpleNamespace(outputs=[
                types.SimpleNamespace(text=f"{len(prompt['prompt_token_ids'])} ids, sample {k}{FAKE_TAIL}")
                for k in range(params.kwargs["n"])]) for prompt, params in zip(prompts, sampling_params)]

        def shutdown(self):
            log.teardown.append("shutdown")

    vllm = types.ModuleType("vllm")
    inputs = types.ModuleType("vllm.inputs")
    distributed = types.ModuleType("vllm.distributed")
    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    inputs.TokensPrompt = log.TokensPrompt = TokensPrompt
    vllm.LLM, vllm.SamplingParams, vllm.inputs, vllm.distributed = LLM, SamplingParams, inputs, distributed
    distributed.parallel_state = parallel_state
    parallel_state.destroy_model_parallel = lambda: log.teardown.append("destroy_model_parallel")
    parallel_state.destroy_distributed_environment = lambda: log.teardown.append("destroy_distributed_environment")
    for name, module in [("vllm", vllm), ("vllm.inputs", inputs), ("vllm.distributed", distributed),
                         ("vllm.distributed.parallel_state", parallel_state)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return log


def requests(long_text: str) -> list[GenerationRequest]:
    return [
        GenerationRequest("Question: what is 2 + 3?\nAnswer:", max_new_tokens=16, stop=("\n",)),
        GenerationRequest("What is 2 + 3?", chat=True, max_new_tokens=16),
        GenerationRequest(long_text, max_new_tokens=24),  # cut: plain
        GenerationRequest(long_text, chat=True, max_new_tokens=24),  # cut: chat
    ]


LONG = " ".join(f"Exemplar {i}: {i} plus {i} is {2 * i}." for i in range(80))
MAX_LENGTH = 160


def test_both_backends_build_the_same_prompt_ids(checkpoint, fake_vllm, caplog):
    folder, model, tokenizer = checkpoint
    batch = requests(LONG)
    hf_ids = [HFBackend(model, tokenizer, max_length=MAX_LENGTH).encode(r) for r in batch]
    # The vLLM side loads the folder's tokenizer files itself (the runner gives it no tokenizer object).
    with caplog.at_level(logging.WARNING), VLLMBackend(folder, dtype="bfloat16", max_length=MAX_LENGTH) as backend:
        backend.generate(batch)
    prompts, _ = fake_vllm.engines[0].calls[0]
    assert all(type(p) is fake_vllm.TokensPrompt for p in prompts)
    assert [dict(p) for p in prompts] == [{"prompt_token_ids": ids} for ids in hf_ids]

    short_plain, short_chat, long_plain, long_chat = hf_ids
    assert short_plain == tokenizer(batch[0].prompt, add_special_tokens=True)["input_ids"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": batch[1].prompt}], tokenize=False,
                                             add_generation_prompt=True)
    assert short_chat == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # Left truncation to leave room for the completion, on both sides, with the warning.
    full_plain = tokenizer(LONG, add_special_tokens=True)["input_ids"]
    assert len(full_plain) > MAX_LENGTH
    assert long_plain == full_plain[-(MAX_LENGTH - 24):]
    assert len(long_chat) == MAX_LENGTH - 24
    assert sum("cut to its last" in r.getMessage() for r in caplog.records) >= 2


def test_llama3_style_chat_template_gives_one_bos():
    tokenizer = llama3_style_tokenizer()
    bos = tokenizer.bos_token_id
    chat = prompt_token_ids(tokenizer, GenerationRequest("hi", chat=True))
    plain = prompt_token_ids(tokenizer, GenerationRequest("hi"))
    assert chat[0] == bos and chat.count(bos) == 1
    assert plain[0] == bos and plain.count(bos) == 1
    # What the test guards against: the rendered template handed over as a text prompt gets a second BOS.
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert tokenizer(rendered, add_special_tokens=True)["input_ids"][:2] == [bos, bos]


@pytest.fixture(scope="module")
def byte_checkpoint(tmp_path_factory):
    tokenizer = byte_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=1).eval()
    folder = tmp_path_factory.mktemp("byte_checkpoint")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def test_engine_options(byte_checkpoint, fake_vllm):
    folder, _, _ = byte_checkpoint
    VLLMBackend(folder, dtype="float16", max_length=MAX_LENGTH, seed=7, gpu_memory_utilization=0.5)
    assert fake_vllm.engines[0].kwargs == dict(model=str(folder), tokenizer=str(folder), dtype="float16", seed=7,
                                               gpu_memory_utilization=0.5, max_model_len=MAX_LENGTH)
    VLLMBackend(folder, dtype="bfloat16")  # no max_length: vLLM's own context length, prompts not cut
    assert "max_model_len" not in fake_vllm.engines[1].kwargs and fake_vllm.engines[1].kwargs["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", [None, "auto", "fp16"])
def test_dtype_is_required_and_explicit(byte_checkpoint, dtype, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # refused before vLLM is even looked for
    with pytest.raises(MftBenchError, match="backend 'vllm' needs the model dtype, one of float32, bfloat16, float16"):
        make_backend("vllm", model_path=str(byte_checkpoint[0]), dtype=dtype)


def test_sampling_params_seeds_and_outputs(byte_checkpoint, fake_vllm):
    folder, model, tokenizer = byte_checkpoint
    batch = [
        GenerationRequest("greedy, three copies", max_new_tokens=8, n=3, stop=("\n", "###")),
        GenerationRequest("sampled twice", max_new_tokens=9, n=2, temperature=0.7, top_p=0.9),
        GenerationRequest("sampled once", chat=True, max_new_tokens=5, temperature=1.0),
    ]
    backend = VLLMBackend(folder, dtype="bfloat16", seed=11)
    outputs = backend.generate(batch)
    prompts, params = fake_vllm.engines[0].calls[0]
    ids = [p["prompt_token_ids"] for p in prompts]
    hf = HFBackend(model, tokenizer)
    assert ids == [hf.encode(r) for r in batch]
    stop_ids = hf.eos_ids  # generation config's EOS, then the tokenizer's: where the hf backend stops
    assert [p.kwargs for p in params] == [
        dict(n=1, temperature=0.0, top_p=1.0, max_tokens=8, stop=["\n", "###"], stop_token_ids=stop_ids,
             seed=request_seed(11, ids[0])),
        dict(n=2, temperature=0.7, top_p=0.9, max_tokens=9, stop=None, stop_token_ids=stop_ids,
             seed=request_seed(11, ids[1])),
        dict(n=1, temperature=1.0, top_p=1.0, max_tokens=5, stop=None, stop_token_ids=stop_ids,
             seed=request_seed(11, ids[2])),
    ]
    # Greedy: decoded once, copied n times; each output cut at the request's stop strings.
    first = f"{len(ids[0])} ids, sample 0"
    assert outputs[0] == [first] * 3
    assert outputs[1] == [f"{len(ids[1])} ids, sample {k}{FAKE_TAIL}" for k in range(2)]
    assert outputs[2] == [f"{len(ids[2])} ids, sample 0{FAKE_TAIL}"]

    # A request's seed depends on its prompt and the run seed only: not on its neighbours or its position.
    backend.generate([batch[2], batch[1]])
    _, again = fake_vllm.engines[0].calls[1]
    assert [p.kwargs["seed"] for p in again] == [params[2].kwargs["seed"], params[1].kwargs["seed"]]
    assert len({p.kwargs["seed"] for p in params}) == 3
    assert request_seed(12, ids[1]) != request_seed(11, ids[1])


def test_close_tears_the_engine_down(byte_checkpoint, fake_vllm):
    folder = byte_checkpoint[0]
    with VLLMBackend(folder, dtype="bfloat16") as backend:
        assert backend.generate([]) == []
    assert fake_vllm.teardown == ["shutdown", "destroy_model_parallel", "destroy_distributed_environment"]
    assert backend.llm is None
    backend.close()  # idempotent
    assert len(fake_vllm.teardown) == 3
    with pytest.raises(RuntimeError, match="after close"):
        backend.generate([GenerationRequest("x")])


def test_runner_evaluates_through_vllm_and_closes_the_engine(byte_checkpoint, fake_vllm, tmp_path):
    folder = str(byte_checkpoint[0])
    metrics = runner.evaluate(None, None, "synthetic_math", tmp_path, options={"n": 3, "max_new_tokens": 12},
                              backend="vllm", model_path=folder, dtype="bfloat16", max_length=MAX_LENGTH, seed=5)
    assert metrics["backend"] == "vllm" and metrics["n"] == 3
    (engine,) = fake_vllm.engines
    assert engine.kwargs["dtype"] == "bfloat16" and engine.kwargs["max_model_len"] == MAX_LENGTH
    assert engine.kwargs["seed"] == 5
    assert fake_vllm.teardown == ["shutdown", "destroy_model_parallel", "destroy_distributed_environment"]
    records = [line for line in (tmp_path / "records.jsonl").read_text().splitlines() if line]
    assert len(records) == 3
    # A finished folder is reused without starting an engine.
    runner.evaluate(None, None, "synthetic_math", tmp_path, options={"n": 3, "max_new_tokens": 12},
                    backend="vllm", model_path=folder, dtype="bfloat16", max_length=MAX_LENGTH, seed=5)
    assert len(fake_vllm.engines) == 1


def test_unavailable_without_vllm_names_the_fix(byte_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(MftBenchError, match=r"pip install 'mft-bench\[vllm\]'"):
        VLLMBackend(Path(byte_checkpoint[0]), dtype="bfloat16")
