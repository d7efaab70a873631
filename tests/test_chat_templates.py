"""Any chat model: lora.py checks the template's prefix property at start-up, and the teacher reads
conversations from their structure, so ChatML, Llama-3 and Gemma-style templates all give token-exact
demonstrations and train; a template that rewrites earlier turns is refused with a reason and advice."""

import asyncio

import pytest
import torch

import grpo
import lora
import train
from conftest import load_smollm_tokenizer, make_tiny_model
from rlm import RLM, Batcher, system_prompt, user_prompt
from tasks import make_task
from teacher import demonstrate

# The templates are written here (shortened from the models' own), over the SmolLM2 vocabulary with each
# template's special tokens added, so no model is downloaded.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}"
          "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Gemma 3: no system role (its text opens the first user turn), the assistant is "model", and the turn
# ends with <end_of_turn> while the tokenizer's eos is <eos> (the model's generation config lists both).
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
         "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
         "{% for m in loop_messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
TEMPLATES = {
    "chatml": dict(template=CHATML, special=[], bos=None, eos="<|im_end|>", end_of_turn="<|im_end|>"),
    "llama3": dict(template=LLAMA3, special=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                             "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>",
                   end_of_turn="<|eot_id|>"),
    "gemma": dict(template=GEMMA, special=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>",
                  eos="<eos>", end_of_turn="<end_of_turn>"),
}
# Templates that render an earlier turn differently once the conversation goes on.
REWRITING = {
    # drops the content of every assistant turn but the last
    "drops earlier replies": CHATML.replace(
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}",
        "{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"),
    # as Qwen3's: the reasoning of the assistant turns before the last user turn is left out
    "strips earlier reasoning": CHATML.replace(
        "m['content'] + '<|im_end|>\n'",
        "(m['content'].split('</think>')[-1].lstrip('\n') if m['role'] == 'assistant' and not loop.last "
        "else m['content']) + '<|im_end|>\n'"),
    # as older Mistral ones: the system prompt goes into the last user turn, wherever that is
    "system prompt in the last user turn": (
        "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
        "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + (sys + '\n\n' if loop.last and sys else '') + m['content'] + ' [/INST]' }}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"),
}


def tokenizer_with(template, special=(), bos=None, eos="<|im_end|>", **_):
    tokenizer = load_smollm_tokenizer()
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    if bos:
        tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    tokenizer.chat_template = template
    return tokenizer


def policy_for(name, seed=0):
    spec = TEMPLATES[name]
    tokenizer = tokenizer_with(**spec)
    model = make_tiny_model(tokenizer, seed=seed)
    end = tokenizer.convert_tokens_to_ids(spec["end_of_turn"])
    if end != tokenizer.eos_token_id:  # Gemma: the model ends its turns with <end_of_turn>, as a trained one does
        with torch.no_grad():
            head = model.lm_head.weight
            head[[end, tokenizer.eos_token_id]] = head[[tokenizer.eos_token_id, end]]
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
    return lora.Policy.from_model(model, tokenizer, lora_rank=8, lora_alpha=16), end


@pytest.fixture(scope="module", params=list(TEMPLATES))
def templated(request):
    return request.param, *policy_for(request.param)


def test_each_template_passes_the_prefix_check_and_ends_turns_with_its_own_token(templated):
    name, policy, end = templated
    assert policy.eos_token_ids[0] == end  # what the teacher appends to a reply, and what the template writes
    messages = [{"role": "system", "content": "S."}, {"role": "user", "content": "Q?"}]
    ids = policy.chat_ids(messages) + policy.encode("FINAL(1)") + [end] + policy.followup_ids("ok", True)
    rendered = policy.tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": "FINAL(1)"}, {"role": "user", "content": "ok"}],
        tokenize=False, add_generation_prompt=True)
    assert text_of(policy, ids) == rendered  # as text: see lora.check_chat_template on merges at a turn's edge


def text_of(policy, ids):
    return policy.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("family, strategy", [("multihop", "look"), ("niah", "split_async"),
                                              ("aggregate", "chunks_async")])
def test_teacher_demonstrations_are_token_exact_under_each_template(templated, family, strategy):
    """Root turns, child RLMs and plain sub-calls: the sampled ids are the teacher's reply + the
    template's end-of-turn, the rest is followup_ids, and each root prompt reads as the template's own
    rendering of the conversation so far."""
    name, policy, end = templated
    task = make_task(family, 8000, seed=2)
    settings = dict(max_turns=2, max_new_tokens=160, max_generated_tokens=1024, max_sub_calls=8)
    demo = asyncio.run(demonstrate(policy, task, strategy, settings, seed=2))
    assert demo.correctness == 1.0, (name, demo.rollout.answer, task.answer)
    for call in demo.rollout.calls:
        for k, start in enumerate(call.prompt_lengths):
            stop = call.prompt_lengths[k + 1] if k + 1 < len(call.prompt_lengths) else len(call.token_ids)
            sampled = [t for t, m in zip(call.token_ids[start:stop], call.sampled_mask[start:stop]) if m]
            assert sampled == policy.encode(call.turns[k]["reply"]) + [end], (name, call.kind)
            if k + 1 < len(call.prompt_lengths):
                assert call.token_ids[start + len(sampled):stop] == \
                    policy.followup_ids(call.turns[k]["observation"], ended_with_eos=True)
    root = demo.rollout.calls[0]
    messages = [{"role": "system", "content": system_prompt(True, True)},
                {"role": "user", "content": user_prompt(task.query, task.context, 300)}]
    for k, turn in enumerate(root.turns):
        rendered = policy.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text_of(policy, root.token_ids[:root.prompt_lengths[k]]) == rendered, (name, k)
        messages += [{"role": "assistant", "content": turn["reply"]}, {"role": "user", "content": turn["observation"]}]


def test_one_warm_start_and_one_rl_step_under_each_template(templated):
    name, policy, end = templated
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    cfg = train.parse_config(["--max_generated_tokens", "512"])
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    demo = asyncio.run(demonstrate(policy, make_task("niah", 2000, seed=1), "regex",
                                   dict(max_turns=1, max_new_tokens=160, max_generated_tokens=512), seed=1))
    warm = grpo.grpo_step(policy, optimizer, [demo.rollout], [1.0], **train.update_settings(cfg))
    rlm = RLM(Batcher(policy, temperature=1.0), max_turns=1, max_new_tokens=12, max_generated_tokens=64)
    rollouts = asyncio.run(train.collect(rlm, [make_task("niah", 2000, seed=3)] * 2, seed=5))
    # Advantages of one sign: whatever was sampled, no token's push is cancelled by another's.
    rl = grpo.grpo_step(policy, optimizer, rollouts, [1.0, 0.5], **train.update_settings(cfg))
    assert warm["train_rows"] == 1 and warm["grad_norm"] > 0 and rl["train_rows"] == 2 and rl["grad_norm"] > 0
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


@pytest.mark.parametrize("name", list(REWRITING))
def test_a_template_that_rewrites_earlier_turns_is_refused_with_why_and_what_instead(name):
    tokenizer = tokenizer_with(REWRITING[name])
    with pytest.raises(ValueError) as refused:
        lora.Policy.from_model(make_tiny_model(tokenizer), tokenizer)
    message = str(refused.value)
    assert "does not keep earlier turns as they were" in message and "token-in, token-out" in message
    assert lora.TEMPLATE_ADVICE in message


def test_train_refuses_such_a_model_at_start(tmp_path):
    tokenizer = tokenizer_with(REWRITING["drops earlier replies"])
    make_tiny_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model", str(tmp_path / "model"), "--out_dir", str(tmp_path / "out")])
    assert "could not load the model" in str(exit_info.value) and "earlier turns" in str(exit_info.value)
