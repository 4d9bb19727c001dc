"""Text encoders and the CLIP tokenizer, built offline.

The tokenizer is transformers' ``CLIPTokenizer`` constructed from the real CLIP byte-pair-encoding vocabulary
that ships inside the open-clip-torch package (``open_clip/bpe_simple_vocab_16e6.txt.gz``), so that training,
tests and the demo tokenize exactly as Stable Diffusion 2 does without reaching a model hub. Text encoders are
transformers ``CLIPTextModel`` (SD2, and SDXL's CLIP ViT-L/14) or ``CLIPTextModelWithProjection`` (SDXL's
OpenCLIP ViT-bigG/14, whose projected pooled output conditions the UNet) built from the configs below (the
published SD2 and SDXL text towers; parameter counts are pinned in tests), or loaded with ``from_pretrained`` from a
local folder or hub id.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from importlib import resources
from typing import Optional

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

__all__ = [
    'SD2_TEXT_ENCODER_CONFIG',
    'SDXL_TEXT_ENCODER_2_CONFIG',
    'SDXL_TEXT_ENCODER_CONFIG',
    'build_clip_tokenizer',
    'build_text_encoder',
    'clip_vocabulary_files',
]

# 49152 - 256 - 2 merges, as in OpenAI's CLIP: the byte alphabet (256), its end-of-word forms (256),
# the merges and the two special tokens make the 49,408-entry vocabulary.
_NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN, EOS_TOKEN = '<|startoftext|>', '<|endoftext|>'

# OpenCLIP ViT-H/14 text tower as used by SD2: 23 of its 24 layers (the penultimate layer's output).
SD2_TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act='gelu',
    projection_dim=512,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=0,
)

# SDXL's first text encoder: OpenAI CLIP ViT-L/14's text tower, all 12 layers (SDXL reads the penultimate hidden
# state from ``output_hidden_states``). Its tokenizer pads with the end token.
SDXL_TEXT_ENCODER_CONFIG = dict(
    SD2_TEXT_ENCODER_CONFIG,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act='quick_gelu',
    projection_dim=768,
)

# SDXL's second text encoder: OpenCLIP ViT-bigG/14's text tower with its projection (the pooled, projected output
# joins the size/crop embedding); tokenizer pads with '!' like SD2's.
SDXL_TEXT_ENCODER_2_CONFIG = dict(
    SD2_TEXT_ENCODER_CONFIG,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
)


def clip_vocabulary_files(cache_dir: Optional[str] = None) -> tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` from open_clip's BPE file; return their paths.

    Files are written once per cache folder (default: ``$XDG_CACHE_HOME/diffusion/clip_tokenizer`` or the
    system temp folder) and reused; the write is atomic so concurrent ranks never read half a file.
    """
    if cache_dir is None:
        base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
        cache_dir = os.path.join(base, 'diffusion', 'clip_tokenizer')
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError:
        cache_dir = os.path.join(tempfile.gettempdir(), 'diffusion_clip_tokenizer')
        os.makedirs(cache_dir, exist_ok=True)
    vocab_path = os.path.join(cache_dir, 'vocab.json')
    merges_path = os.path.join(cache_dir, 'merges.txt')
    if os.path.exists(vocab_path) and os.path.exists(merges_path):
        return vocab_path, merges_path

    bpe_file = resources.files('open_clip').joinpath('bpe_simple_vocab_16e6.txt.gz')
    with bpe_file.open('rb') as f:
        lines = gzip.decompress(f.read()).decode('utf-8').split('\n')
    merges = lines[1 : _NUM_MERGES + 1]  # the first line is a version header
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [t + '</w>' for t in alphabet] + [''.join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    _atomic_write(vocab_path, json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    _atomic_write(merges_path, '#version: 0.2\n' + '\n'.join(merges) + '\n')
    return vocab_path, merges_path


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)


def build_clip_tokenizer(pretrained: Optional[str] = None, pad_token: str = '!', **kwargs) -> CLIPTokenizer:
    """The CLIP tokenizer: from ``pretrained`` (folder or hub id with a ``tokenizer`` layout) or built offline.

    Args:
        pretrained (str, optional): Path or hub id to load with ``CLIPTokenizer.from_pretrained``.
        pad_token (str): Padding token of the offline tokenizer. SD2 pads with ``'!'`` (token id 0); SD1 and
            OpenAI CLIP pad with the end token. Default: ``'!'``.
        **kwargs: Passed to ``from_pretrained`` (e.g. ``subfolder='tokenizer'``).
    """
    if pretrained is not None:
        return CLIPTokenizer.from_pretrained(pretrained, **kwargs)
    vocab_path, merges_path = clip_vocabulary_files()
    return CLIPTokenizer(
        vocab_path,
        merges_path,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=77,
    )


def build_text_encoder(
    config: Optional[dict] = None, pretrained: Optional[str] = None, with_projection: bool = False, **kwargs
) -> CLIPTextModel:
    """A ``CLIPTextModel`` (or ``CLIPTextModelWithProjection`` when ``with_projection``) loaded from ``pretrained``
    or built from ``config`` with random weights."""
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    if pretrained is not None:
        return cls.from_pretrained(pretrained, **kwargs)
    if config is None:
        raise ValueError('build_text_encoder needs either `config` or `pretrained`.')
    return cls(CLIPTextConfig(**config))
