"""Caption token ids padded to the tokenizer's maximum length, without transformers' per-call machinery.

The SD pipelines tokenize with ``tokenizer(captions, padding='max_length', max_length=model_max_length,
truncation=True)``. For transformers' Python ("slow") tokenizers, such as the ``CLIPTokenizer`` of SD2 and SDXL, most
of that call is argument resolution, ``BatchEncoding`` and tensor conversion around the two steps that matter
(``tokenize`` and ``convert_tokens_to_ids``): about half of its time for a short caption. The dataloader tokenizes
every sample on the training process, so :func:`padded_token_ids` takes the same two steps and applies the
truncation, special tokens (``build_inputs_with_special_tokens``) and padding transformers would, giving identical
ids (tests compare them on long, empty, non-ASCII and special-token captions). Tokenizers it cannot reproduce that
way (fast Rust tokenizers, left padding or truncation) go through their own call.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizer

__all__ = ['padded_token_ids']


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


def padded_token_ids(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Token ids (B, L), L the tokenizer's ``model_max_length``: those of
    ``tokenizer(captions, padding='max_length', max_length=L, truncation=True).input_ids``."""
    length = tokenizer.model_max_length
    if not _direct(tokenizer):
        return tokenizer(
            list(captions), padding='max_length', max_length=length, truncation=True, return_tensors='pt'
        ).input_ids
    room = length - tokenizer.num_special_tokens_to_add()
    pad = tokenizer.pad_token_id
    rows = []
    for caption in captions:
        ids = tokenizer.build_inputs_with_special_tokens(
            tokenizer.convert_tokens_to_ids(tokenizer.tokenize(caption))[:room]
        )
        rows.append(ids + [pad] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)
