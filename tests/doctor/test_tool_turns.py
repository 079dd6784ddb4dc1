"""The doctor's token-stream check of tool turns: it passes where the rollout's tokens are the template's, and
fails naming the first differing token where the template renders the conversation as other text."""

from __future__ import annotations

from thinkforge.chat import ChatFormat
from thinkforge.doctor.tool_turns import check_tool_turns
from thinkforge.rollout.settings import ToolsConfig
from thinkforge.tokenizer import CHAT_TEMPLATE, build_synthetic_tokenizer

TOOLS = ToolsConfig(tool="python", wall_s=10.0)

#: like the templates that drop the thinking of earlier turns (DeepSeek-R1's, Qwen3's): ChatML, but an assistant
#: turn that is not the last loses its "<think>" line
DROPS_EARLIER_THINKING = CHAT_TEMPLATE.replace(
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
    "{% generation %}{{ (message['content'] if loop.last else message['content'].replace('<think>\n', ''))"
    " + '<|im_end|>' }}{% endgeneration %}",
)


def chat_with(template: str) -> ChatFormat:
    tokenizer = build_synthetic_tokenizer()
    tokenizer.chat_template = template
    return ChatFormat(tokenizer, tools=True)


def test_the_built_in_template_passes():
    finding = check_tool_turns(chat_with(CHAT_TEMPLATE), TOOLS, "What is 6 * 7?")
    assert finding.status == "pass", finding


def test_a_template_that_drops_earlier_thinking_fails_naming_the_first_differing_token():
    assert DROPS_EARLIER_THINKING != CHAT_TEMPLATE
    finding = check_tool_turns(chat_with(DROPS_EARLIER_THINKING), TOOLS, "What is 6 * 7?")
    assert finding.status == "fail", finding
    assert "the rollout has '<think>'" in finding.measured and "first difference at token" in finding.measured
