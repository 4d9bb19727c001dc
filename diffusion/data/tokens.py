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

For transformers' ``CLIPTokenizer`` itself, :class:`_ClipIds` also takes the tokenizer's own steps without their
generic machinery, which is most of the remaining time for a short caption: the added-token split (a Python trie walk
over every character) is skipped when no added token occurs in the caption, ftfy's ``fix_text`` when the caption is
printable ASCII without ``&`` (where every one of its fixes leaves the text as it is), the byte-to-unicode mapping for
printable ASCII words (which it maps to themselves), and the ids are read from the vocabulary directly. The rest is
the tokenizer's own pattern, whitespace cleaning and (cached) BPE; tests compare the ids with the tokenizer's call on
long, empty, non-ASCII, HTML-escaped, control-character and special-token captions.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import regex
import torch
from transformers import CLIPTokenizer, PreTrainedTokenizer

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


# The methods of the call chain _ClipIds reproduces: a subclass overriding any of them goes through the tokenizer.
_CLIP_STEPS = {
    'tokenize': PreTrainedTokenizer.tokenize,
    'prepare_for_tokenization': PreTrainedTokenizer.prepare_for_tokenization,
    'convert_tokens_to_ids': PreTrainedTokenizer.convert_tokens_to_ids,
    '_convert_token_to_id_with_added_voc': PreTrainedTokenizer._convert_token_to_id_with_added_voc,
    '_convert_token_to_id': CLIPTokenizer._convert_token_to_id,
    '_tokenize': CLIPTokenizer._tokenize,
}
_WHITESPACE = regex.compile(r'\s+')  # transformers' whitespace_clean: regex.sub(r'\s+', ' ', text).strip()


class _ClipIds:
    """``tokenizer.convert_tokens_to_ids(tokenizer.tokenize(caption))`` for transformers' ``CLIPTokenizer`` with
    ftfy, the same steps without the generic machinery (see the module docstring); :meth:`make` gives ``None`` for
    any other tokenizer."""

    def __init__(self, tokenizer: Any, fix_text: Callable[[str], str], unk: int, splitters: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.fix_text = fix_text
        self.splitters = splitters  # tokenize() splits a caption at these; one containing none of them is one piece
        self.pattern = tokenizer.pat
        self.byte_encoder = tokenizer.byte_encoder
        self.bpe = tokenizer.bpe
        self.added = tokenizer._added_tokens_encoder  # looked up first, as convert_tokens_to_ids does
        self.encoder = tokenizer.encoder
        self.unk = unk

    @classmethod
    def make(cls, tokenizer: Any) -> Optional[_ClipIds]:
        if not isinstance(tokenizer, CLIPTokenizer):
            return None
        if any(getattr(type(tokenizer), name, None) is not method for name, method in _CLIP_STEPS.items()):
            return None
        try:
            import ftfy
        except ImportError:  # the tokenizer then uses BasicTokenizer
            return None
        trie_tokens = getattr(getattr(tokenizer, 'tokens_trie', None), '_tokens', None)
        if tokenizer.fix_text is not ftfy.fix_text or not isinstance(trie_tokens, set):
            return None
        if getattr(tokenizer, 'do_lower_case', False):  # tokenize() would lowercase around the special tokens
            return None
        unk = tokenizer.encoder.get(str(tokenizer.unk_token))
        if not isinstance(unk, int):
            return None
        splitters = () if tokenizer.split_special_tokens else tuple(trie_tokens)
        return cls(tokenizer, ftfy.fix_text, unk, splitters)

    def __call__(self, caption: str) -> list[int]:
        if any(token in caption for token in self.splitters):
            tokenizer = self.tokenizer
            return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(caption))
        if not caption:
            return []
        plain = caption.isascii() and caption.isprintable() and '&' not in caption
        text = _WHITESPACE.sub(' ', caption if plain else self.fix_text(caption)).strip().lower()
        pieces: list[str] = []
        for word in self.pattern.findall(text):
            if not (word.isascii() and word.isprintable()):
                word = ''.join(self.byte_encoder[b] for b in word.encode('utf-8'))
            pieces.extend(self.bpe(word).split(' '))
        added, get, unk = self.added, self.encoder.get, self.unk
        return [added[piece] if piece in added else get(piece, unk) for piece in pieces]


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
            self.clip_ids = _ClipIds.make(tokenizer)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids (B, L), those of ``tokenizer(captions, padding='max_length', max_length=L, truncation=True)``."""
        tokenizer = self.tokenizer
        if not self.direct:
            return tokenizer(
                list(captions), padding='max_length', max_length=self.length, truncation=True, return_tensors='pt'
            ).input_ids
        rows = []
        for caption in captions:
            if self.clip_ids is not None:
                ids = self.clip_ids(caption)[: self.room]
            else:
                ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(caption))[: self.room]
            if self.around is None:
                ids = tokenizer.build_inputs_with_special_tokens(ids)
            else:
                ids = self.around[0] + ids + self.around[1]
            rows.append(ids + [self.pad] * (self.length - len(ids)))
        return torch.from_numpy(np.array(rows, dtype=np.int64))  # a third of torch.tensor's time for one row


def padded_token_ids(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Token ids (B, L), L the tokenizer's ``model_max_length``: those of
    ``tokenizer(captions, padding='max_length', max_length=L, truncation=True).input_ids``."""
    return CaptionTokenizer(tokenizer)(captions)
