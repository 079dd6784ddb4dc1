"""Tool turns, token for token: the tokens a multi-turn rollout trains on (the engine's, plus the tool turns the
environment inserts) against the chat template's rendering of the same conversation.

They can part in two ways. Benign: the model sampled a string as other tokens than the tokenizer would give it
(the text is the same; the trainer scores what was sampled). A bug: the template renders the conversation as
other text than the rollout holds, e.g. it drops an earlier turn's thinking or a separator at a tool boundary,
so a model trained on the rollouts sees at inference prompts it never saw. The check builds a conversation with
a real call (run in the sandbox), encodes each model turn as a sampler would produce it, and names the first
token where the two differ.
"""

from __future__ import annotations

from collections.abc import Sequence

from thinkforge.chat import ChatFormat, ToolFormat, ToolTemplateError
from thinkforge.doctor.findings import Finding
from thinkforge.rollout.settings import ToolsConfig
from thinkforge.sandbox import SandboxLimits, run_python

NAME = "tool turns: token stream"


def scripted_turns(tools: ToolFormat) -> tuple[str, str, str]:
    """A reply that thinks, calls the tool, and answers from its output: (call turn, code, answer turn)."""
    code = "print(6 * 7)"
    if tools.syntax == "hermes":
        call = '<think>\nLet me compute it.\n</think>\n<tool_call>\n{"name": "python", "arguments": {"code": "' + code
        call += '"}}\n</tool_call>'
    else:
        call = f"<think>\nLet me compute it.\n```python\n{code}\n```\n"
    return call, code, "</think>\nThe answer is \\boxed{42}."


def first_difference(left: Sequence[int], right: Sequence[int]) -> int | None:
    """The first position where the two differ (the shorter one's end if it is a prefix of the other); None if
    `left` is a prefix of `right`."""
    for position, (a, b) in enumerate(zip(left, right)):
        if a != b:
            return position
    return None if len(left) <= len(right) else len(right)


def check_tool_turns(chat: ChatFormat, tools: ToolsConfig, problem: str) -> Finding:
    try:
        tool_format = ToolFormat.for_chat(chat, tools.syntax)
    except ToolTemplateError as error:
        return Finding(
            NAME, "fail", str(error), "model.tokenizer: a tokenizer directory whose chat template has a tool role"
        )
    call, code, answer = scripted_turns(tool_format)
    output = run_python(code, SandboxLimits(wall_s=tools.wall_s, cpu_s=tools.cpu_s), tools.max_output_chars).output
    prompt = chat.prompt(problem)
    stream = [
        *chat.encode(prompt),
        *chat.encode(call),
        *chat.encode(tool_format.result(output)),
        *chat.encode(answer),
        chat.turn_end_id,
    ]
    conversation = [
        {"role": "user", "content": problem},
        {"role": "assistant", "content": call},
        {"role": "tool", "content": output},
        {"role": "assistant", "content": answer},
    ]
    rendered = chat.encode(chat.render(conversation))
    where = first_difference(stream, rendered)
    summary = f"{tool_format.syntax} calls; {len(stream)} tokens of prompt, call, tool turn and answer"
    if where is None:
        return Finding(NAME, "pass", f"{summary} equal the template's rendering token for token")
    tokenizer = chat.tokenizer
    ours = str(tokenizer.decode(stream[where:], skip_special_tokens=False))
    theirs = str(tokenizer.decode(rendered[where:], skip_special_tokens=False))
    context = str(tokenizer.decode(stream[max(0, where - 8) : where], skip_special_tokens=False))
    token = tokenizer.convert_ids_to_tokens(stream[where]) if where < len(stream) else "(end)"
    other = tokenizer.convert_ids_to_tokens(rendered[where]) if where < len(rendered) else "(end)"
    detail = (
        f"first difference at token {where} (after {context!r}): the rollout has {token!r}, "
        f"the template renders {other!r}"
    )
    if theirs.startswith(ours):
        return Finding(NAME, "warn", f"{summary}: same text, other tokens; {detail}")
    return Finding(
        NAME,
        "fail",
        f"{summary}: {detail} (the rollout goes on {ours[:60]!r}, the template {theirs[:60]!r})",
        "the template renders a multi-turn conversation as other text than the rollouts hold: the model would "
        "train on one and be prompted with the other. Use a template that renders earlier turns as they were "
        "(model.tokenizer: a tokenizer directory with that chat template)",
    )
