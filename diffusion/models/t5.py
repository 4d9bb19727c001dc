"""The T5 text encoder of Stable Diffusion 3 and a T5 tokenizer built offline.

Production runs load T5 v1.1 XXL's encoder (transformers' ``T5EncoderModel``) and its SentencePiece tokenizer with
``from_pretrained`` from a local folder or hub id (``use_safetensors=True``). Without a hub (tests, the CPU demo) the
encoder is built from :data:`TINY_T5_CONFIG` and the tokenizer by :func:`build_t5_tokenizer`: a real
``T5TokenizerFast`` around a ``tokenizers`` Unigram model (the model type of T5's SentencePiece vocabulary, with
its Metaspace pre-tokenizer, ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 and ``</s>`` appended to every text). Its
vocabulary is estimated here, deterministically and in milliseconds, from the captions of
:func:`diffusion.data.synthetic.caption_corpus`: every whitespace-separated word of the corpus with its log
frequency as the piece score, plus single characters (ASCII letters, digits, punctuation, with and without the
word-start marker) at a lower score, so that any ASCII text tokenizes (unseen words into characters) and nothing
else maps to ``<unk>``. The same code gives the same tokenizer on every rank and machine, so nothing is checked in.
"""

from __future__ import annotations

import collections
import math
import string
from typing import Any, Optional

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from diffusion.data.synthetic import caption_corpus

__all__ = ['T5_XXL_ENCODER_CONFIG', 'TINY_T5_CONFIG', 'build_t5_encoder', 'build_t5_tokenizer']

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = '<pad>', '</s>', '<unk>'
_WORD_START = '\u2581'  # SentencePiece's word-start marker

# T5 v1.1 XXL's encoder as SD3 uses it (4096 wide, 24 layers, 64 heads of 64, gated GELU, untied embeddings).
T5_XXL_ENCODER_CONFIG = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj='gated-gelu',
    layer_norm_epsilon=1e-6,
    dropout_rate=0.1,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
)

# CPU size; a vocabulary of 256 holds the offline tokenizer's pieces (about 240).
TINY_T5_CONFIG = dict(T5_XXL_ENCODER_CONFIG, vocab_size=256, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


def _offline_unigram() -> Tokenizer:
    words = collections.Counter(_WORD_START + w for caption in caption_corpus() for w in caption.split())
    total = sum(words.values())
    vocab = [(PAD_TOKEN, 0.0), (EOS_TOKEN, 0.0), (UNK_TOKEN, 0.0)]
    vocab += [(w, math.log(n / total)) for w, n in sorted(words.items(), key=lambda item: (-item[1], item[0]))]
    # Characters score below any word, so that known words stay whole and unknown ones fall back to characters.
    floor = math.log(1 / total) - 1.0
    characters = list(string.ascii_letters + string.digits + string.punctuation)
    known = {piece for piece, _ in vocab}
    for piece in [_WORD_START, *characters, *(_WORD_START + c for c in characters)]:
        if piece not in known:
            vocab.append((piece, floor))
            known.add(piece)
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f'$A {EOS_TOKEN}', pair=f'$A {EOS_TOKEN} $B {EOS_TOKEN}', special_tokens=[(EOS_TOKEN, 1)]
    )
    return tokenizer


def build_t5_tokenizer(pretrained: Optional[str] = None, max_length: int = 256, **kwargs: Any) -> T5TokenizerFast:
    """A ``T5TokenizerFast`` that pads and truncates to ``max_length``: loaded, or built offline (module docstring).

    Args:
        pretrained (str, optional): Folder or hub id for ``T5TokenizerFast.from_pretrained``.
        max_length (int): Tokens per text (``model_max_length``). Default: ``256`` (SD3).
        **kwargs: Passed to ``from_pretrained`` (e.g. ``subfolder='tokenizer_3'``).
    """
    if pretrained is not None:
        return T5TokenizerFast.from_pretrained(pretrained, model_max_length=max_length, **kwargs)
    return T5TokenizerFast(
        tokenizer_object=_offline_unigram(),
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        extra_ids=0,
        model_max_length=max_length,
    )


def build_t5_encoder(config: Optional[dict] = None, pretrained: Optional[str] = None, **kwargs: Any) -> T5EncoderModel:
    """A ``T5EncoderModel`` loaded from ``pretrained`` (``use_safetensors=True``) or built from ``config``."""
    if pretrained is not None:
        return T5EncoderModel.from_pretrained(pretrained, use_safetensors=True, **kwargs)
    if config is None:
        raise ValueError('build_t5_encoder needs either `config` (T5Config fields) or `pretrained`.')
    return T5EncoderModel(T5Config(**config))
