"""The built-in tokenizer of models built from a config (the demo's), trained in-process on the synthetic task so
nothing is downloaded. How conversations are rendered with it, or any tokenizer, is `thinkforge.chat`.

Byte-level BPE (any text encodes), digits split one per token (arithmetic stays learnable), and a ChatML template
with `<think>` markers and `{% generation %}` blocks so SFT can mask everything but the assistant's tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

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
