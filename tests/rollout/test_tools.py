"""Multi-turn rollouts with tool calls, on a scripted engine: the token stream is the engine's tokens plus the
template's tool turns, token for token; tool tokens are marked; every way a call can go wrong is handled and
counted."""

from __future__ import annotations

import pytest

from thinkforge.chat import ChatFormat, ToolFormat, ToolTemplateError
from thinkforge.data.packing import IGNORE_INDEX, completion_documents
from thinkforge.rollout.base import Rollout, rollout_of
from thinkforge.rollout.settings import SamplingParams, ToolsConfig
from thinkforge.rollout.tools import ToolRollouts, tool_call_reward
from thinkforge.tokenizer import build_synthetic_tokenizer

CALL = "<think>\nLet me multiply.\n```python\nprint(347 * 829)\n```\n"
ANSWER = "It is 287663.\n</think>\n\\boxed{287663}"

#: a hermes-style template (Qwen2.5's way): tools listed in the system turn, results in a user turn
HERMES_TEMPLATE = (
    '{%- if tools -%}{{ \'<|im_start|>system\nYou may call python: <tool_call>{"name": "python", '
    '"arguments": {"code": ...}}</tool_call><|im_end|>\n\' }}{%- endif -%}'
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    "{#- <tool_call> -#}"
)


def tiny_chat(template: str | None = None) -> ChatFormat:
    tokenizer = build_synthetic_tokenizer()
    if template is not None:
        tokenizer.chat_template = template
    return ChatFormat(tokenizer, tools=True)


class ScriptedEngine:
    """Answers each turn from `script` (the turn's text by how many tool turns the prompt already holds), as an
    engine would: the turn's tokens, cut at the first stop string or ended by the turn's end token."""

    def __init__(self, chat: ChatFormat, script: list[str], *, ends: bool = True) -> None:
        self.chat, self.script, self.ends, self.calls = chat, script, ends, []

    def __call__(self, prompts, sampling: SamplingParams, *, seed: int, progress=None) -> list[list[Rollout]]:
        self.calls.append((list(prompts), sampling, seed))
        groups = []
        for index, prompt in enumerate(prompts):
            text = prompt if isinstance(prompt, str) else self.chat.tokenizer.decode(prompt)
            turn = text.count("<|im_start|>tool") + text.count("<tool_response>")
            reply = self.chat.encode(self.script[min(turn, len(self.script) - 1)])
            row = (reply + ([self.chat.turn_end_id] if self.ends else []))[: sampling.max_new_tokens]
            logprobs = [-0.5] * len(row)
            rollout = rollout_of(self.chat.tokenizer, index, row, logprobs, self.chat.end_ids, sampling.stop_strings)
            groups.append([rollout] * sampling.num_samples)
        return groups


def sample(chat, script, settings=None, budget=256, *, ends=True):
    engine = ScriptedEngine(chat, script, ends=ends)
    tools = ToolRollouts(engine, chat, settings or ToolsConfig(tool="python", wall_s=10.0))
    prompt = chat.prompt("What is 347 * 829?")
    (group,) = tools([prompt], SamplingParams(num_samples=2, max_new_tokens=budget), seed=3)
    return group, prompt, engine


def test_the_tool_turn_is_what_the_template_renders_after_a_reply():
    fenced = ToolFormat.for_chat(tiny_chat())
    assert (fenced.syntax, fenced.call_end) == ("fenced", "```\n")
    assert fenced.result("42\n") == "<|im_end|>\n<|im_start|>tool\n42\n<|im_end|>\n<|im_start|>assistant\n"
    hermes = ToolFormat.for_chat(tiny_chat(HERMES_TEMPLATE))
    assert (hermes.syntax, hermes.call_end) == ("hermes", "</tool_call>")
    assert hermes.result("42") == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_template_without_a_tool_role_is_refused_in_one_line():
    no_tool = "{%- for m in messages -%}{%- if m['role'] == 'tool' -%}{{ raise_exception('no tool role') }}" + (
        "{%- endif -%}{{ m['content'] }}{%- endfor -%}"
    )
    with pytest.raises(ToolTemplateError, match="no tool role"):
        ToolFormat.for_chat(tiny_chat(no_tool))
    drops = "{%- for m in messages -%}{%- if m['role'] != 'tool' -%}{{ m['content'] }}{%- endif -%}{%- endfor -%}"
    with pytest.raises(ToolTemplateError, match="drops tool messages"):
        ToolFormat.for_chat(tiny_chat(drops))


@pytest.mark.parametrize(
    ("turn", "expected"),
    [
        ("x\n```python\nprint(1)\n```\n", ("print(1)\n", None)),
        ("```python\na = 1\n```python\nb\n```\n", (None, "nested")),
        ("no opener\n```\n", (None, "malformed")),
    ],
)
def test_fenced_calls_parse(turn, expected):
    assert ToolFormat.for_chat(tiny_chat()).parse(turn) == expected


@pytest.mark.parametrize(
    ("turn", "expected"),
    [
        ('<tool_call>\n{"name": "python", "arguments": {"code": "print(2)"}}\n</tool_call>', ("print(2)", None)),
        ('<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(3)\\"}"}</tool_call>', ("print(3)", None)),
        ('<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>', (None, "malformed")),
        ("<tool_call>print(1)</tool_call>", (None, "malformed")),
        ('<tool_call><tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call>', (None, "nested")),
    ],
)
def test_hermes_calls_parse(turn, expected):
    assert ToolFormat.for_chat(tiny_chat(HERMES_TEMPLATE)).parse(turn) == expected


@pytest.mark.parametrize("template", [None, HERMES_TEMPLATE])
def test_the_token_stream_is_the_engines_tokens_and_the_templates_tool_turn(template):
    chat = tiny_chat(template)
    call = CALL if template is None else '<tool_call>{"name": "python", "arguments": {"code": "print(347 * 829)"}}'
    call += "" if template is None else "</tool_call>"
    (rollout, _), prompt, engine = sample(chat, [call, ANSWER])
    result = "287663\n"
    assert rollout.turns == (("assistant", call), ("tool", result), ("assistant", ANSWER))
    assert rollout.text == call + ANSWER, "the rewards read the model's own text"
    assert rollout.finished and [c.ok for c in rollout.calls] == [True]
    # the trainer's sequence: the same tokens as the chat template's rendering of the whole conversation
    conversation = [
        {"role": "user", "content": "What is 347 * 829?"},
        {"role": "assistant", "content": call},
        {"role": "tool", "content": result},
        {"role": "assistant", "content": ANSWER},
    ]
    rendered = chat.encode(chat.render(conversation))
    stream = chat.encode(prompt) + list(rollout.token_ids)
    assert rendered[: len(stream)] == stream and len(rendered) - len(stream) <= 1  # the template's final new line
    # the second turn was sampled from token ids, not from re-rendered text
    second_prompt = engine.calls[1][0][0]
    assert isinstance(second_prompt, list) and second_prompt == stream[: len(second_prompt)]
    inserted = chat.encode(ToolFormat.for_chat(chat).result(result))
    expected = [False] * len(chat.encode(call)) + [True] * len(inserted) + [False] * (len(chat.encode(ANSWER)) + 1)
    assert list(rollout.inserted) == expected
    assert all(logprob == 0.0 for logprob, mark in zip(rollout.logprobs, rollout.inserted) if mark)
    assert all(logprob == -0.5 for logprob, mark in zip(rollout.logprobs, rollout.inserted) if not mark)


def test_tool_tokens_carry_no_labels_when_packed():
    chat = tiny_chat()
    (rollout, _), prompt, _ = sample(chat, [CALL, ANSWER])
    prompt_ids = chat.encode(prompt)
    for share in (False, True):
        documents = completion_documents(
            prompt_ids, [(0, rollout.token_ids, rollout.trainable)] * 2, share_prompt=share
        )
        labels = [label for document in documents for label in document.labels]
        assert labels.count(IGNORE_INDEX) - sum(rollout.inserted) * 2 == (len(labels) - 2 * len(rollout.token_ids))


def test_a_turn_past_max_turns_and_a_call_the_budget_cuts_end_the_rollout_unfinished():
    chat = tiny_chat()
    group, _, _ = sample(chat, [CALL], ToolsConfig(tool="python", max_turns=2))
    rollout = group[0]
    assert [role for role, _ in rollout.turns] == ["assistant", "tool", "assistant"]
    assert not rollout.finished and [c.not_run for c in rollout.calls] == [None, "max_turns"]
    assert tool_call_reward(rollout, ToolsConfig(tool="python", over_budget_call_reward=-0.5)) == -0.5
    short, _, _ = sample(chat, [CALL, ANSWER], budget=len(chat.encode(CALL)) + 5)
    assert len(short[0].token_ids) == len(chat.encode(CALL)) + 5 and not short[0].finished


@pytest.mark.parametrize(
    ("script", "not_run"),
    [
        (["```python\nx = 1\n```python\nprint(2)\n```\n", ANSWER], "nested"),
        (["no code\n```\n", ANSWER], "malformed"),
    ],
)
def test_malformed_and_nested_calls_get_an_error_back_and_the_rollout_goes_on(script, not_run):
    (rollout, _), _, _ = sample(tiny_chat(), script)
    assert rollout.finished and [call.not_run for call in rollout.calls] == [not_run]
    assert rollout.turns[1][1].startswith("error:")
    assert tool_call_reward(rollout, ToolsConfig(tool="python", failed_call_reward=-0.25)) == -0.25


def test_a_call_never_closed_is_counted():
    (rollout, _), _, _ = sample(tiny_chat(), ["```python\nprint(1)"])
    assert rollout.finished and [call.not_run for call in rollout.calls] == ["unclosed"]


def test_a_spent_step_budget_runs_no_more_calls():
    chat = tiny_chat()
    engine = ScriptedEngine(chat, [CALL, ANSWER])
    tools = ToolRollouts(engine, chat, ToolsConfig(tool="python", step_budget_s=1e-6))
    ((first, _),) = tools([chat.prompt("q")], SamplingParams(num_samples=2, max_new_tokens=256), seed=0)
    assert [call.not_run for call in first.calls] == [None], "the budget is checked before a round of calls"
    ((later, _),) = tools([chat.prompt("q")], SamplingParams(num_samples=2, max_new_tokens=256), seed=0)
    assert [call.not_run for call in later.calls] == ["step_budget"]
    tools.start_step()
    ((fresh, _),) = tools([chat.prompt("q")], SamplingParams(num_samples=2, max_new_tokens=256), seed=0)
    assert [call.not_run for call in fresh.calls] == [None]
