"""Generation backends: batch-size invariance, order, stop strings, seeded sampling, the vllm error path."""

from __future__ import annotations

import copy
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from mft_bench.backbone import byte_tokenizer, tiny_model
from mft_bench.errors import MftBenchError
from mft_bench.evaluation.backends.hf import attention, cpu_matmul, kv_cache, scheduler
from mft_bench.evaluation.backends import make_backend, truncate_at_stop
from mft_bench.evaluation.backends.hf import HFBackend, gumbel_noise
from mft_bench.evaluation.backends.vllm import UNAVAILABLE, VLLMBackend
from mft_bench.evaluation.base import GenerationRequest


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: OpenMP's thread handoffs cost more than they save, and on a shared CPU far more (10x measured).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer, device):
    # Seeds picked so that greedy outputs differ between prompts (the invariance check then means something).
    return {"llama": tiny_model("llama", vocab_size=len(tokenizer), seed=0).to(device).eval(),
            "gpt2": tiny_model("gpt2", vocab_size=len(tokenizer), seed=2).to(device).eval()}


@pytest.fixture
def on_cpu(device):
    """For the tests of the CPU decode path (MKL-packed weights): skipped with ``--device`` other than cpu."""
    if device.type != "cpu":
        pytest.skip("the MKL-packed decode weights are the CPU path")


def prompts(count: int = 12) -> list[str]:
    # Lengths from ~14 to ~70 bytes: batches mix heavily padded and unpadded rows.
    return [f"Question {i}: " + "what is " * (i % 7) + f"{i * 13} plus {i}?" for i in range(count)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_independent_of_batch_size(models, tokenizer, arch):
    requests = [GenerationRequest(p, max_new_tokens=16) for p in prompts()]
    requests.append(GenerationRequest("a chat message", chat=True, max_new_tokens=16))
    by_size = {bs: HFBackend(models[arch], tokenizer, batch_size=bs).generate(requests) for bs in (1, 4, 32)}
    assert by_size[1] == by_size[4] == by_size[32]
    assert len({o[0] for o in by_size[1]}) >= 6, "outputs too uniform for the comparison to be meaningful"
    assert all(len(o) == 1 for o in by_size[1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_shrinks_to_the_kv_memory_it_has(models, tokenizer, arch):
    """With room for the caches of 3 rows only, 3 rows decode at a time, and the completions do not change."""
    from mft_bench.evaluation.backends.kv_budget import KV_SHARE, kv_bytes_per_token

    model = models[arch]
    requests = [GenerationRequest(p, max_new_tokens=16) for p in prompts()]
    full = HFBackend(model, tokenizer, batch_size=32, memory_bytes=2**40)
    expected = full.generate(requests)
    assert full.peak_rows == len(requests)
    longest = max(len(full.encode(r)) for r in requests) + 16
    room = int(3.5 * kv_bytes_per_token(model) * longest / KV_SHARE)
    small = HFBackend(model, tokenizer, batch_size=32, memory_bytes=room)
    assert small.generate(requests) == expected
    assert small.peak_rows == 3
    tiny = HFBackend(model, tokenizer, batch_size=32, memory_bytes=1)  # not even one: one at a time, no OOM
    assert tiny.generate(requests[:4]) == expected[:4] and tiny.peak_rows == 1


def test_results_in_request_order(models, tokenizer):
    requests = [GenerationRequest(p, max_new_tokens=8) for p in prompts(8)]
    backend = HFBackend(models["llama"], tokenizer, batch_size=3)
    forward = backend.generate(requests)
    backward = backend.generate(requests[::-1])
    assert backward == forward[::-1]
    alone = [backend.generate([r])[0] for r in requests[:3]]
    assert alone == forward[:3]


def test_chat_request_uses_chat_template(models, tokenizer):
    backend = HFBackend(models["llama"], tokenizer)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert backend.encode(GenerationRequest("hi", chat=True)) == tokenizer(templated, add_special_tokens=False)["input_ids"]
    chat = backend.generate([GenerationRequest("hi", chat=True, max_new_tokens=10)])
    plain = backend.generate([GenerationRequest(templated, max_new_tokens=10)])
    raw = backend.generate([GenerationRequest("hi", max_new_tokens=10)])
    assert chat == plain and chat != raw


def test_stop_strings_and_per_request_lengths(models, tokenizer):
    backend = HFBackend(models["llama"], tokenizer, batch_size=8)
    prompt = prompts()[0]
    full = backend.generate([GenerationRequest(prompt, max_new_tokens=24)])[0][0]
    assert len(full) > 6
    stop = full[3:5]
    cut = full[: full.find(stop)]
    mixed = backend.generate([
        GenerationRequest(prompt, max_new_tokens=24, stop=(stop,)),
        GenerationRequest(prompt, max_new_tokens=24, stop=("never appears", stop)),
        GenerationRequest(prompt, max_new_tokens=24),
        GenerationRequest(prompt, max_new_tokens=5),
        GenerationRequest(prompts()[5], max_new_tokens=24),
    ])
    assert mixed[0] == [cut] and mixed[1] == [cut]
    assert mixed[2] == [full]
    assert mixed[3] == backend.generate([GenerationRequest(prompt, max_new_tokens=5)])[0]
    assert mixed[3][0] != full and full.startswith(mixed[3][0].rstrip("\ufffd"))
    # A stop string at the end of the prompt does not end the completion before it starts.
    tail = prompt[-2:]
    assert backend.generate([GenerationRequest(prompt, max_new_tokens=24, stop=(tail,))])[0][0] == truncate_at_stop(full, (tail,))


def test_truncate_at_stop():
    assert truncate_at_stop("abc\n\nQuestion: x", ("Question:", "\n\n")) == "abc"
    assert truncate_at_stop("no stop here", ("zz",)) == "no stop here"
    assert truncate_at_stop("text", ()) == "text"
    assert truncate_at_stop("text", ("",)) == "text"


def test_sampling_reproducible_and_batch_independent(models, tokenizer):
    requests = [GenerationRequest(p, max_new_tokens=10, temperature=0.9, top_p=0.95, n=3) for p in prompts(6)]
    model = models["llama"]
    first = HFBackend(model, tokenizer, batch_size=4, seed=7).generate(requests)
    again = HFBackend(model, tokenizer, batch_size=32, seed=7).generate(requests)
    other = HFBackend(model, tokenizer, batch_size=4, seed=8).generate(requests)
    assert first == again
    assert first != other
    assert all(len(samples) == 3 for samples in first)
    assert any(len(set(samples)) > 1 for samples in first), "n samples of one prompt should differ"
    greedy = HFBackend(model, tokenizer).generate([GenerationRequest(prompts()[0], max_new_tokens=10, n=3)])
    assert len(greedy[0]) == 3 and len(set(greedy[0])) == 1


def test_gumbel_max_draws_from_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, float("-inf")])
    rows = 6000
    generators = [torch.Generator().manual_seed(s) for s in range(rows)]
    picks = (logits.double() + gumbel_noise(generators, 4)).argmax(-1)
    freq = torch.bincount(picks, minlength=4).double() / rows
    assert freq[3] == 0
    assert torch.allclose(freq, torch.softmax(logits.double(), -1), atol=0.025)


def test_greedy_matches_transformers_generate(models, tokenizer):
    for arch, model in models.items():
        backend = HFBackend(model, tokenizer)
        for prompt in prompts()[:3]:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
            with torch.inference_mode():
                ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            expected = tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
            assert backend.generate([GenerationRequest(prompt, max_new_tokens=12)]) == [[expected]], arch


def test_make_backend_errors(models, tokenizer):
    with pytest.raises(MftBenchError, match="unknown backend 'tgi'"):
        make_backend("tgi", model=models["llama"], tokenizer=tokenizer)
    with pytest.raises(MftBenchError, match="model_path"):
        make_backend("vllm", model=models["llama"], tokenizer=tokenizer)
    assert isinstance(make_backend("hf", model=models["llama"], tokenizer=tokenizer, batch_size=2), HFBackend)


def test_vllm_without_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(MftBenchError) as err:
        VLLMBackend("some/checkpoint", dtype="bfloat16")
    assert str(err.value) == UNAVAILABLE
    assert "pip install 'mft-bench[vllm]'" in UNAVAILABLE and "backend: hf" in UNAVAILABLE


def test_vllm_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MftBenchError, match="needs the vllm package and a CUDA GPU"):
        make_backend("vllm", model_path="some/checkpoint", dtype="bfloat16")


def test_cache_without_row_dropping_gives_same_results(models, tokenizer, monkeypatch):
    requests = [GenerationRequest(p, max_new_tokens=3 + i % 9, stop=("a",)) for i, p in enumerate(prompts())]
    backend = HFBackend(models["llama"], tokenizer, batch_size=32)
    pruned = backend.generate(requests)
    from transformers import cache_utils

    for cls in vars(cache_utils).values():
        if isinstance(cls, type) and "batch_select_indices" in vars(cls):
            monkeypatch.delattr(cls, "batch_select_indices")
    assert backend.generate(requests) == pruned


def test_a_sliding_window_cache_runs_in_fixed_batches_that_match_one_at_a_time(tokenizer):
    # A sliding-window cache cannot drop or take rows: finished rows stay in the batch, ignored, and the next
    # prompts are prefilled once the whole batch is finished; results must equal one prompt at a time.
    from transformers import AutoModelForCausalLM, MistralConfig

    from mft_bench.evaluation.backends.hf.forward import ModelForward

    vocab = len(tokenizer)
    config = MistralConfig(bos_token_id=vocab - 3, eos_token_id=vocab - 2, pad_token_id=vocab - 1, vocab_size=vocab,
                           hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, sliding_window=24, tie_word_embeddings=False)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.inference_mode():
        cache = ModelForward(model, vocab - 1).prefill([[5, 6, 7], [8, 9, 10]])[0]
    assert not kv_cache.mergeable(cache)
    requests = [GenerationRequest(p, max_new_tokens=2 + (5 * i) % 13, stop=("e",) if i % 3 == 0 else ())
                for i, p in enumerate(prompts(14))]
    requests += [GenerationRequest(p, max_new_tokens=9, temperature=0.8, top_p=0.9, n=2) for p in prompts(4)]
    alone = [HFBackend(model, tokenizer, batch_size=1, seed=1).generate([r])[0] for r in requests]
    assert len({a[0] for a in alone}) >= 6, "outputs too uniform for the comparison to be meaningful"
    backend = HFBackend(model, tokenizer, batch_size=4, seed=1)
    assert backend.generate(requests) == alone and backend.peak_rows == 4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_refilled_batches_match_one_at_a_time(models, tokenizer, arch):
    # Varied lengths and stops: rows finish at different steps, so pending rows are merged into a running batch
    # (of other widths); greedy and sampled results must not notice.
    requests = [GenerationRequest(p, max_new_tokens=2 + (5 * i) % 17, stop=("e",) if i % 3 == 0 else ())
                for i, p in enumerate(prompts(20))]
    requests += [GenerationRequest(p, max_new_tokens=3 + i % 11, temperature=0.8, n=2) for i, p in enumerate(prompts(9))]
    alone = [HFBackend(models[arch], tokenizer, batch_size=1, seed=3).generate([r])[0] for r in requests]
    for bs in (4, 8):
        assert HFBackend(models[arch], tokenizer, batch_size=bs, seed=3).generate(requests) == alone, bs


def test_cpu_weights_are_untouched_while_generating_and_forwards_restored_after(models, tokenizer):
    model = models["llama"]
    before = {name: (p, p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    HFBackend(model, tokenizer).generate([GenerationRequest(p, max_new_tokens=2) for p in prompts(10)])
    for name, p in model.named_parameters():
        param, pointer, values = before[name]
        assert p is param and p.data_ptr() == pointer and torch.equal(p, values), name
    assert not any("forward" in m.__dict__ for m in model.modules()), "packed forwards should be removed after"


@pytest.mark.skipif(not cpu_matmul.mkl_packing_available(), reason="torch built without MKL")
def test_packed_products_equal_plain_ones():
    # Decode steps go through MKL-packed weights, padded to the packed row count: the values of F.linear (up to
    # summation order), and too few or too many rows take the plain path.
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    packed = {size: torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), size) for size in (8, 16, 32)}
    for n in (1, 3, 4, 7, 8, 9, 16, 17, 32, 33):
        x = torch.randn(n, 1, 48, generator=gen)
        out = cpu_matmul._packed_product(x, linear, packed)
        if n < cpu_matmul.MIN_PACKED_ROWS or n > 32:
            assert out is None, n
            continue
        plain = torch.nn.functional.linear(x, linear.weight, linear.bias)
        assert out.shape == plain.shape
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not cpu_matmul.mkl_packing_available(), reason="torch built without MKL")
def test_generation_uses_packed_products_and_matches_one_at_a_time(models, tokenizer, monkeypatch, on_cpu):
    used = []
    original = cpu_matmul._packed_product

    def counting(x, linear, packed):
        out = original(x, linear, packed)
        used.append(out is not None)
        return out

    monkeypatch.setattr(cpu_matmul, "_packed_product", counting)
    requests = [GenerationRequest(p, max_new_tokens=4) for p in prompts(8)]
    batched = HFBackend(models["llama"], tokenizer, batch_size=8).generate(requests)
    assert any(used), "decode steps of 8 rows should use the packed weights"
    assert batched == [HFBackend(models["llama"], tokenizer, batch_size=1).generate([r])[0] for r in requests]


@pytest.mark.skipif(not cpu_matmul.mkl_packing_available(), reason="torch built without MKL")
def test_packed_weights_are_kept_across_calls_and_packed_again_after_a_change(models, tokenizer, monkeypatch, on_cpu):
    model = copy.deepcopy(models["llama"])
    packed = []
    original = cpu_matmul._pack

    def counting(weight, rows):
        packed.append(weight.data_ptr())
        return original(weight, rows)

    monkeypatch.setattr(cpu_matmul, "_pack", counting)
    requests = [GenerationRequest(p, max_new_tokens=3) for p in prompts(8)]
    backend = HFBackend(model, tokenizer, batch_size=8)
    first = backend.generate(requests)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(packed) == len(linears)  # one row count (8) per weight
    assert backend.generate(requests) == first and len(packed) == len(linears)  # nothing packed again
    changed = linears[1].weight
    with torch.no_grad():
        changed.mul_(-3.0)  # in place: same storage, new version
    packed.clear()
    after = backend.generate(requests)
    assert packed == [changed.data_ptr()]  # that weight only
    assert after == HFBackend(model, tokenizer, batch_size=8).generate(requests)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prefix_runs_once_and_changes_no_result(models, tokenizer, arch, monkeypatch):
    # A few-shot block shared by every prompt: computed once, then only each prompt's own tokens run.
    shots = "Question: 2 plus 2?\nAnswer: 4.\n\nQuestion: 3 plus 5?\nAnswer: 8.\n\n"
    requests = [GenerationRequest(shots + f"Question: {i * 7} plus {i}?" + " ok" * (i % 4) + "\nAnswer:",
                                  max_new_tokens=3 + (5 * i) % 11, stop=("\n\n",)) for i in range(11)]
    alone = [HFBackend(models[arch], tokenizer, batch_size=1).generate([r])[0] for r in requests]
    model = models[arch]
    widths = []
    original = model.forward

    def recording_forward(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    decode_calls = []
    original_attention = attention.generation_attention

    def counting_attention(module, query, *args, **kwargs):
        decode_calls.append(query.shape[2] == 1 and attention.shared_columns.get() > 0)
        return original_attention(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "generation_attention", counting_attention)
    backend = HFBackend(model, tokenizer, batch_size=4)
    shared = len(backend.encode(GenerationRequest(shots + "Question: ")))
    assert backend.generate(requests) == alone
    assert model.config._attn_implementation == "sdpa"  # restored after the shared-prefix decoding
    assert any(decode_calls), "decode steps should attend to the shared prefix once per batch"
    prefills = [shape for shape in widths if shape[1] > 1]
    assert prefills[0] == (1, shared)  # the prefix, once
    longest_own = max(len(backend.encode(r)) for r in requests) - shared
    assert all(width <= longest_own for _, width in prefills[1:]), prefills


@pytest.mark.parametrize("groups", [1, 3])
def test_shared_prefix_decode_attention_equals_sdpa(groups):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=groups, training=False, is_causal=True)
    batch, kv_heads, shared, columns, dim = 5, 2, 7, 12, 8
    gen = torch.Generator().manual_seed(0)
    key, value = (torch.randn(batch, kv_heads, columns, dim, generator=gen) for _ in range(2))
    key[:, :, :shared], value[:, :, :shared] = key[0, :, :shared], value[0, :, :shared]  # the shared prefix
    query = torch.randn(batch, kv_heads * groups, 1, dim, generator=gen)
    mask = torch.ones(batch, 1, 1, columns, dtype=torch.bool)
    mask[1, ..., shared:shared + 3] = False  # padding between the prefix and a row's own tokens
    mask[3, ..., shared] = False
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    token = attention.shared_columns.set(shared)
    try:
        got, _ = attention.generation_attention(module, query, key, value, mask, scaling=0.3)
        float_mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        got_float, _ = attention.generation_attention(module, query, key, value, float_mask, scaling=0.3)
    finally:
        attention.shared_columns.reset(token)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_float, expected)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_decode_attention_is_bitwise_sdpa(groups, masked):
    # Without a shared prefix, a decode step's query heads are grouped by their key/value head instead of the
    # key/values being copied per query head: with a mask, transformers does the same grouping itself where it
    # has `pack_gqa` (5.2x), so the same bits; older versions copy the key/values (repeat_kv), and without a mask
    # transformers calls sdpa with enable_gqa: equal up to summation order.
    from transformers.integrations import sdpa_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=groups, training=False, is_causal=True)
    batch, kv_heads, capacity, columns, dim = 6, 2, 20, 13, 8
    gen = torch.Generator().manual_seed(1)
    key, value = (torch.randn(batch, kv_heads, capacity, dim, generator=gen)[:, :, :columns] for _ in range(2))
    query = torch.randn(batch, 1, kv_heads * groups, dim, generator=gen).transpose(1, 2)  # as the model makes it
    mask = None
    if masked:
        mask = torch.ones(batch, 1, 1, columns, dtype=torch.bool)
        mask[2, ..., :5] = False  # left padding
        mask[4, ..., :1] = False
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got, _ = attention.generation_attention(module, query, key, value, mask, scaling=0.3)
    assert got.shape == expected.shape
    if groups == 1 or (masked and hasattr(sdpa_attention, "pack_gqa")):
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected)


def test_finished_rows_leave_the_cache_in_place():
    # Each finished row's place is taken by a kept row from the end, so a step copies one row per finished row;
    # the buffered cache then holds exactly what index_select would give, in a view of its own buffers.
    from transformers.cache_utils import DynamicCache

    done = [False, True, False, False, True, False, True]
    order = kv_cache.compaction(done)
    assert order == [0, 5, 2, 3] and sorted(order) == [j for j, d in enumerate(done) if not d]
    assert kv_cache.compaction([True, True]) == [] and kv_cache.compaction([False, False]) == [0, 1]
    gen = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(len(done), 2, 5, 4, generator=gen) for _ in range(2))
    cache = DynamicCache()
    cache.update(keys.clone(), values.clone(), 0)
    kv_cache.buffer_layers(cache, 3)
    storage = cache.layers[0].key_buffer.data_ptr()
    cache.batch_select_indices(torch.tensor(order))
    layer = cache.layers[0]
    assert torch.equal(layer.keys, keys[order]) and torch.equal(layer.values, values[order])
    assert layer.key_buffer.data_ptr() == storage  # no new buffer
    layer.update(torch.ones(4, 2, 1, 4), torch.ones(4, 2, 1, 4))  # and it still grows in place
    assert layer.keys.shape == (4, 2, 6, 4) and torch.equal(layer.keys[:, :, :5], keys[order])


@pytest.mark.parametrize("drop", [False, True])
def test_rows_are_merged_into_buffers_with_room(drop):
    # Rows of several caches go into one tensor per layer, each padded after the shared prefix columns; columns
    # no row attends to are dropped; with room, the layers are buffered and grow in place.
    from transformers.cache_utils import DynamicCache

    gen = torch.Generator().manual_seed(2)
    shared, parts, expected = 2, [], []
    for rows, own in ((3, 4), (2, 6)):
        keys, values = (torch.randn(rows, 2, shared + own, 4, generator=gen) for _ in range(2))
        cache = DynamicCache()
        cache.update(keys, values, 0)
        mask = torch.ones(rows, shared + own, dtype=torch.long)
        if drop:
            mask[:, shared] = 0  # the first own column, attended by no row of either part
        parts.append((cache, mask))
        expected.append(tuple(kv_cache.pad_at(t, shared + 6, shared, -2) for t in (keys, values)))
    masks = torch.cat([kv_cache.pad_at(m, shared + 6, shared) for _, m in parts])
    columns = torch.nonzero(masks.any(0)).squeeze(1)
    cache, mask = kv_cache.concat_rows(parts, shared, room=5)
    layer = cache.layers[0]
    assert torch.equal(mask, masks[:, columns])
    assert torch.equal(layer.keys, torch.cat([k for k, _ in expected])[:, :, columns])
    assert torch.equal(layer.values, torch.cat([v for _, v in expected])[:, :, columns])
    assert type(layer) is kv_cache.BufferedLayer and layer.key_buffer.shape[-2] == len(columns) + 5
    storage = layer.key_buffer.data_ptr()
    layer.update(torch.ones(5, 2, 1, 4), torch.ones(5, 2, 1, 4))
    assert layer.key_buffer.data_ptr() == storage and layer.keys.shape[-2] == len(columns) + 1


@pytest.mark.parametrize("wider", [False, True])
def test_rows_are_admitted_into_spare_rows_in_place(wider):
    # A running batch takes prefilled rows by writing them into its buffers' spare rows, padded after the shared
    # prefix to the batch's width: only the new rows are copied. Rows wider than the batch widen it first.
    from transformers.cache_utils import DynamicCache

    gen = torch.Generator().manual_seed(3)
    shared, own, new_own = 2, 5, 7 if wider else 3
    keys, values = (torch.randn(3, 2, shared + own, 4, generator=gen) for _ in range(2))
    cache = DynamicCache()
    cache.update(keys, values, 0)
    kv_cache.buffer_layers(cache, 4, rows=6)
    storage = cache.layers[0].key_buffer.data_ptr()
    mask = torch.ones(3, shared + own, dtype=torch.long)
    mask[1, shared:shared + 2] = 0
    new_keys, new_values = (torch.randn(4, 2, shared + new_own, 4, generator=gen) for _ in range(2))
    new_keys[:, :, :shared], new_values[:, :, :shared] = keys[:1, :, :shared], values[:1, :, :shared]
    new_cache = DynamicCache()
    new_cache.update(new_keys, new_values, 0)
    new_mask = torch.ones(4, shared + new_own, dtype=torch.long)
    new_mask[0, shared] = 0
    cache, merged = kv_cache.admit(cache, mask, new_cache, new_mask, 2, shared, rows=6)
    width = shared + max(own, new_own)
    pad = lambda t: kv_cache.pad_at(t, width, shared, -2)
    layer = cache.layers[0]
    assert torch.equal(layer.keys, torch.cat([pad(keys), pad(new_keys[:2])]))
    assert torch.equal(layer.values, torch.cat([pad(values), pad(new_values[:2])]))
    assert torch.equal(merged, torch.cat([kv_cache.pad_at(m, width, shared) for m in (mask, new_mask[:2])]))
    assert (layer.key_buffer.data_ptr() == storage) != wider  # in place unless the batch had to widen
    assert len(layer.key_buffer) == 6
    rest = kv_cache.without_first_rows(new_cache, 2)
    assert torch.equal(rest.layers[0].keys, new_keys[2:])


def test_dead_columns_are_dropped_in_place_once_they_are_a_quarter():
    from transformers.cache_utils import DynamicCache

    gen = torch.Generator().manual_seed(4)
    shared = 3
    keys, values = (torch.randn(4, 2, shared + 8, 4, generator=gen) for _ in range(2))
    cache = DynamicCache()
    cache.update(keys, values, 0)
    kv_cache.buffer_layers(cache, 4, rows=5)
    storage = cache.layers[0].key_buffer.data_ptr()
    mask = torch.ones(4, shared + 8, dtype=torch.long)
    mask[:, shared] = 0  # one dead column of 8: kept
    assert kv_cache.drop_dead_columns(cache, mask, shared)[1] is mask
    mask[:, shared + 1] = 0
    mask[:2, shared + 2:shared + 5] = 0  # partly attended columns stay
    live = torch.tensor([0, 1, 2, 5, 6, 7, 8, 9, 10])
    cache, kept = kv_cache.drop_dead_columns(cache, mask, shared)
    layer = cache.layers[0]
    assert torch.equal(kept, mask[:, live])
    assert torch.equal(layer.keys, keys[:, :, live]) and torch.equal(layer.values, values[:, :, live])
    assert layer.key_buffer.data_ptr() == storage
    layer.update(torch.ones(4, 2, 1, 4), torch.ones(4, 2, 1, 4))  # and it grows from there
    assert layer.keys.shape[-2] == len(live) + 1 and torch.equal(layer.keys[:, :, :len(live)], keys[:, :, live])


def test_the_batch_stays_full_while_prompts_wait(models, tokenizer, monkeypatch):
    # A finished row's place is taken at the next step by a prefilled waiting row: until the last prefill every
    # decode step runs a full batch (rows finish at different steps here: varied lengths and stops).
    model = models["llama"]
    requests = [GenerationRequest(p, max_new_tokens=2 + (5 * i) % 13, stop=("e",) if i % 3 == 0 else ())
                for i, p in enumerate(prompts(30))]
    alone = [HFBackend(model, tokenizer, batch_size=1).generate([r])[0] for r in requests]
    shapes = []
    original = model.forward

    def recording_forward(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    assert HFBackend(model, tokenizer, batch_size=8).generate(requests) == alone
    last_prefill = max(i for i, (_, width) in enumerate(shapes) if width > 1)
    steps = [rows for rows, width in shapes[:last_prefill] if width == 1]
    assert len(steps) > 10 and set(steps) == {8}, steps


def test_cache_rows_are_allocated_for_the_rows_a_call_can_have(models, tokenizer, monkeypatch):
    # A call with fewer prompts than the batch size allocates cache rows for those prompts only.
    seen = []
    original = kv_cache.buffer_layers

    def recording(cache, room, rows=0):
        original(cache, room, rows)
        seen.append(len(cache.layers[0].key_buffer))

    monkeypatch.setattr(scheduler, "buffer_layers", recording)  # a fresh batch's cache
    monkeypatch.setattr(kv_cache, "buffer_layers", recording)  # rows admitted into a running one
    requests = [GenerationRequest(p, max_new_tokens=4) for p in prompts(3)]
    HFBackend(models["llama"], tokenizer, batch_size=32).generate(requests)
    assert seen and set(seen) == {3}


def test_stream_yields_each_request_once_as_it_finishes(models, tokenizer, monkeypatch):
    # Requests come out as they finish, each once, with what generate gives; between two results nothing of
    # the generation is in force in the caller's code.
    model = models["llama"]
    requests = [GenerationRequest(p, max_new_tokens=1 if i % 4 == 0 else 12) for i, p in enumerate(prompts(12))]
    requests += [GenerationRequest(p, max_new_tokens=6, temperature=0.9, n=2) for p in prompts(3)]
    backend = HFBackend(model, tokenizer, batch_size=4)
    expected = backend.generate(requests)
    forwards = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: forwards.append(1) or original(*a, **k))
    order, got, seen_at = [], {}, []
    for index, completions in backend.generate_stream(requests):
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
        assert model.config._attn_implementation == "sdpa"
        assert not any("forward" in m.__dict__ for m in model.modules() if m is not model)
        order.append(index)
        got[index] = completions
        seen_at.append(len(forwards))
    assert sorted(order) == list(range(len(requests)))
    assert [got[i] for i in range(len(requests))] == expected
    assert all(len(got[i]) == 2 for i in range(12, 15))
    assert order != sorted(order)
    assert seen_at[0] < len(forwards) / 4 and len(set(seen_at)) >= 5, (seen_at, len(forwards))


def test_stream_closed_early_leaves_the_model_as_it_was(models, tokenizer):
    model = models["llama"]
    stream = HFBackend(model, tokenizer, batch_size=2).generate_stream(
        [GenerationRequest(p, max_new_tokens=4) for p in prompts(6)])
    next(stream)
    stream.close()
    assert model.config._attn_implementation == "sdpa" and not torch.is_inference_mode_enabled()
    assert not any("forward" in m.__dict__ for m in model.modules())
