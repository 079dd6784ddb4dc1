"""The built-in tokenizer for the synthetic task, trained in-process so nothing is downloaded.

Byte-level BPE (any text encodes), digits split one per token (arithmetic stays learnable), and a ChatML template
with `<think>` markers and `{% generation %}` blocks so SFT can mask everything but the assistant's tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from thinkforge.data import synthetic

PAD, BOS_TURN, EOS_TURN, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
SPECIAL_TOKENS = [PAD, BOS_TURN, EOS_TURN, THINK, END_THINK]
VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def _training_corpus() -> list[str]:
    problems = synthetic.generate("train", 3000, min_level=1, max_level=synthetic.MAX_LEVEL, seed=12345)
    chat_words = "system user assistant Think step by step, then give the final answer in \\boxed{}."
    return [p.prompt + "\n" + p.completion for p in problems] + [chat_words]


def _train_bpe(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def _chat_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TURN,
        pad_token=PAD,
        additional_special_tokens=[BOS_TURN, THINK, END_THINK],
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def train_chat_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `corpus` with digits one per token, our special tokens and the ChatML template: the
    built-in tokenizer's recipe, for scripts that need a larger vocabulary (e.g. trained on benchmark texts)."""
    return _chat_tokenizer(_train_bpe(corpus, vocab_size))


@lru_cache(maxsize=1)
def _synthetic_tokenizer_json() -> str:
    return _train_bpe(_training_corpus(), VOCAB_SIZE).to_str()


def build_synthetic_tokenizer() -> PreTrainedTokenizerFast:
    """Deterministic: the same corpus and settings give byte-identical tokenizers on every machine."""
    return _chat_tokenizer(Tokenizer.from_str(_synthetic_tokenizer_json()))


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    *,
    system_prompt: str | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The chat template's text, with `system_prompt` first unless the conversation brings its own: how every
    stage, the evaluator and the curation commands turn messages into model input."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, system_prompt: str | None = None) -> str:
    """A problem as the start of an assistant reply."""
    return render_chat(
        tokenizer, [{"role": "user", "content": prompt}], system_prompt=system_prompt, add_generation_prompt=True
    )


_REPLY_MARK = "\u00a7reply\u00a7"


def turn_end_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token the chat template closes an assistant reply with (`<|im_end|>`, `<|eot_id|>`, ...).

    It need not be the tokenizer's EOS: Qwen2.5 base tokenizers end text with `<|endoftext|>` and chat turns with
    `<|im_end|>`. SFT must train the turn's own end token and generation must stop at it. Found by rendering a
    reply and reading the special token right after it; the EOS when there is no template or no such token.
    """
    conversation = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": _REPLY_MARK}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except (ValueError, TypeError):
        return tokenizer.eos_token
    end = text.find(_REPLY_MARK)
    if end < 0:
        return tokenizer.eos_token
    tail = text[end + len(_REPLY_MARK) :]
    specials = {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}
    matches = [token for token in specials if token and tail.startswith(token)]
    return max(matches, key=len) if matches else tokenizer.eos_token


def end_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> list[int]:
    """Every token that ends a completion: the chat turn's end, the tokenizer's EOS and the model's declared
    `generation_config.eos_token_id` (an int or a list), turn end first."""
    declared = getattr(generation_config, "eos_token_id", None)
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    ids = [tokenizer.convert_tokens_to_ids(turn_end_token(tokenizer)), tokenizer.eos_token_id, *declared]
    return list(dict.fromkeys(i for i in ids if i is not None))
