"""Caption token ids padded to the tokenizer's maximum length, without transformers' per-call machinery.

The SD pipelines tokenize with ``tokenizer(captions, padding='max_length', max_length=model_max_length,
truncation=True)``. For transformers' Python ("slow") tokenizers, such as the ``CLIPTokenizer`` of SD2 and SDXL, most
of that call is argument resolution, ``BatchEncoding`` and tensor conversion around the two steps that matter
(``tokenize`` and ``convert_tokens_to_ids``): about half of its time for a short caption. The dataloader tokenizes
every sample on the training process, so :func:`padded_token_ids` takes the same two steps and applies the
truncation, special tokens (``build_inputs_with_special_tokens``) and padding transformers would, giving identical
ids (tests compare them on long, empty, non-ASCII and special-token captions). Tokenizers it cannot reproduce that
way (fast Rust tokenizers, left padding or truncation) go through their own call. :class:`CaptionTokenizer` keeps
what does not depend on the caption (the checks, the pad id, the special tokens) for one tokenizer, for the
dataloader's per-sample calls.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from transformers import PreTrainedTokenizer

__all__ = ['CaptionTokenizer', 'padded_token_ids']


def _direct(tokenizer: Any) -> bool:
    """Whether :func:`padded_token_ids` reproduces this tokenizer's padded call step by step."""
    return (
        isinstance(tokenizer, PreTrainedTokenizer)
        and tokenizer.truncation_side == 'right'
        and tokenizer.padding_side == 'right'
        and tokenizer.pad_token_id is not None
        and isinstance(tokenizer.model_max_length, int)
        and tokenizer.num_special_tokens_to_add() < tokenizer.model_max_length < 1_000_000
    )


def _special_tokens_around(tokenizer: Any) -> Optional[tuple[list[int], list[int]]]:
    """The ids ``build_inputs_with_special_tokens`` puts before and after any sequence (CLIP: start, end), or
    ``None`` when it does something else than wrapping, checked on sequences of zero, one and two ids."""
    marks = [-101, -102]  # ids no vocabulary has, so they can be found in the output
    try:
        one = tokenizer.build_inputs_with_special_tokens(marks[:1])
        if one.count(marks[0]) != 1:
            return None
        at = one.index(marks[0])
        before, after = one[:at], one[at + 1 :]
        wraps = (
            tokenizer.build_inputs_with_special_tokens(marks) == before + marks + after
            and tokenizer.build_inputs_with_special_tokens([]) == before + after
            and len(before) + len(after) == tokenizer.num_special_tokens_to_add()
        )
    except Exception:  # a tokenizer that looks its ids up: it is called per caption instead
        return None
    return (before, after) if wraps else None


class CaptionTokenizer:
    """:func:`padded_token_ids` for one tokenizer, with what does not depend on the caption worked out once.

    The checks of :func:`_direct`, the pad id, the room left by the special tokens and the special tokens around a
    caption cost about 80 us a caption on a 2-core VM when looked up through transformers' attribute machinery on
    every call, a fifth of tokenizing a short caption; the dataloader tokenizes every sample. Settings changed on
    the tokenizer after this was made are not seen: make a new one.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.length = tokenizer.model_max_length
        self.direct = _direct(tokenizer)
        if self.direct:
            self.room = self.length - tokenizer.num_special_tokens_to_add()
            self.pad = tokenizer.pad_token_id
            self.around = _special_tokens_around(tokenizer)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids (B, L), those of ``tokenizer(captions, padding='max_length', max_length=L, truncation=True)``."""
        tokenizer = self.tokenizer
        if not self.direct:
            return tokenizer(
                list(captions), padding='max_length', max_length=self.length, truncation=True, return_tensors='pt'
            ).input_ids
        rows = []
        for caption in captions:
            ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(caption))[: self.room]
            if self.around is None:
                ids = tokenizer.build_inputs_with_special_tokens(ids)
            else:
                ids = self.around[0] + ids + self.around[1]
            rows.append(ids + [self.pad] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


def padded_token_ids(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Token ids (B, L), L the tokenizer's ``model_max_length``: those of
    ``tokenizer(captions, padding='max_length', max_length=L, truncation=True).input_ids``."""
    return CaptionTokenizer(tokenizer)(captions)
