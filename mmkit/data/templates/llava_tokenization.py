"""Token ids and labels of a rendered conversation, as LLaVA's training makes them.

LLaVA renders the whole conversation to text and tokenizes it with ``tokenizer_image_token``
(llava/mm_utils.py): the text is split only at ``<image>``, each chunk is tokenized whole, and
the BOS token that the tokenizer puts at the head of every chunk is kept once, at the very start.
mmkit does the same, with every ``<image>`` expanded in place into the encoder's image tokens,
so a model sees in mmkit exactly the prompts it saw in LLaVA.

The labels come from characters, not from token counts: a token trains when its characters lie
inside a trained span of the text (a reply and its end marker), read from a fast tokenizer's
offsets. LLaVA counts tokens of re-tokenized pieces instead, and silently masks a whole sample when
a tokenizer disagrees with its arithmetic. Here a token that crosses the edge of a reply makes the
sample fail with its reason (it is skipped and reported), never a mis-masked one.

A tokenizer without offsets (a slow, Python one) takes a fallback that checks itself: a span's
edge is at the token count of the text before it, which holds only if that prefix tokenizes to a
prefix of the chunk's ids; where it does not, the sample fails with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from mmkit.core.errors import DataError
from mmkit.core.interfaces import IMAGE_TOKEN

IGNORE_INDEX = -100

Span = tuple[int, int]


@dataclass(frozen=True)
class RenderedConversation:
    """A conversation as one text, with the character spans of what trains (replies and their
    end markers)."""

    text: str
    trained: tuple[Span, ...]


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]


def encode_rendered(rendered: RenderedConversation, tokenizer: PreTrainedTokenizerBase,
                    num_image_tokens: int) -> EncodedConversation:
    """``tokenizer_image_token`` of ``rendered.text``, each image expanded to ``num_image_tokens``
    positions, with labels: the token id where it trains, else ``IGNORE_INDEX``."""
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    input_ids: list[int] = []
    labels: list[int] = []
    keeps_bos = False
    start = 0
    for index, chunk in enumerate(rendered.text.split(IMAGE_TOKEN)):
        if index:
            input_ids += [image_token_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            start += len(IMAGE_TOKEN)
        ids, trained = _tokenize_chunk(chunk, start, rendered.trained, tokenizer)
        if index == 0:
            keeps_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
        elif keeps_bos and ids and ids[0] == tokenizer.bos_token_id:
            ids, trained = ids[1:], trained[1:]  # one BOS for the whole prompt, as LLaVA keeps it
        input_ids += ids
        labels += [token if train else IGNORE_INDEX for token, train in zip(ids, trained)]
        start += len(chunk)
    return EncodedConversation(input_ids, labels)


def _tokenize_chunk(chunk: str, start: int, spans: Sequence[Span],
                    tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[bool]]:
    """The chunk's ids (with the tokenizer's own special tokens) and which of them train."""
    if tokenizer.is_fast:
        encoding = tokenizer(chunk, return_offsets_mapping=True)
        trained = [_trains((start + begin, start + end), spans, tokenizer, token)
                   for token, (begin, end) in zip(encoding.input_ids, encoding.offset_mapping)]
        return list(encoding.input_ids), trained
    return _tokenize_chunk_by_prefixes(chunk, start, spans, tokenizer)


def _trains(token_span: Span, spans: Sequence[Span], tokenizer: PreTrainedTokenizerBase, token: int) -> bool:
    begin, end = token_span
    if begin == end:
        return False  # added by the tokenizer (BOS), not read from the text
    for first, last in spans:
        if first <= begin and end <= last:
            return True
        if begin < last and first < end:
            piece = tokenizer.convert_ids_to_tokens(token)
            raise DataError(f"the token {piece!r} crosses the edge of a reply, so its label would be wrong")
    return False


def _tokenize_chunk_by_prefixes(chunk: str, start: int, spans: Sequence[Span],
                                tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[bool]]:
    ids = tokenizer(chunk).input_ids
    trained = [False] * len(ids)
    for first, last in spans:
        begin, end = max(first - start, 0), min(last - start, len(chunk))
        if begin >= end:
            continue
        edges = [_prefix_length(chunk, position, ids, tokenizer) for position in (begin, end)]
        for position in range(*edges):
            trained[position] = True
    return ids, trained


def _prefix_length(chunk: str, position: int, ids: list[int], tokenizer: PreTrainedTokenizerBase) -> int:
    """How many of the chunk's ids the text before ``position`` makes; only defined where the
    prefix's own tokens are exactly the chunk's first ones."""
    if position == len(chunk):
        return len(ids)
    prefix = tokenizer(chunk[:position]).input_ids
    # A tokenizer may close every text with its own tokens (an EOS); those are not the chunk's.
    while prefix and prefix != ids[: len(prefix)] and prefix[-1] in tokenizer.all_special_ids:
        prefix = prefix[:-1]
    if prefix != ids[: len(prefix)]:
        raise DataError("the text before a reply tokenizes differently on its own, so the reply's "
                        "tokens cannot be told apart without offsets (use a fast tokenizer)")
    return len(prefix)


def image_text_for(tokenizer: PreTrainedTokenizerBase) -> str:
    """What a chat template should write for an image so that tokenizing the whole prompt at once
    (as transformers' processors do) gives the ids of LLaVA's tokenization, which tokenizes the
    text after each image on its own. SentencePiece tokenizers start every text they tokenize with
    a word-boundary marker (the dummy prefix) but add none after a special token inside a text: for
    them the image is followed by a space, which becomes that marker."""
    probe = "\nWhat is it?"
    alone = tokenizer(probe, add_special_tokens=False).input_ids
    for image_text in (IMAGE_TOKEN, IMAGE_TOKEN + " "):
        if tokenizer(image_text + probe, add_special_tokens=False).input_ids[1:] == alone:
            return image_text
    raise DataError(
        f"{type(tokenizer).__name__}: no text after {IMAGE_TOKEN} makes one-pass tokenization agree with "
        "LLaVA's per-chunk tokenization, so an exported chat template would prompt the model differently"
    )
