"""Synthetic captions for the caption stage ("telephoning" in CommonCanvas).

CommonCanvas replaces the noisy or missing alt-text of Creative-Commons images with captions written by a
pretrained image-captioning model, BLIP-2. This module wraps transformers' ``Blip2ForConditionalGeneration`` and
``Blip2Processor`` behind a small :class:`Captioner` interface, and keeps the captioners in a
:class:`diffusion.utils.Registry` so that ``--captioner blip2`` picks one and third-party packages can add more
through the ``diffusion_captioners`` entry-point group.

:func:`save_tiny_blip2` writes a tiny random-weight BLIP-2 folder (model, image processor and a tokenizer built
offline) so that tests, the demo and benchmarks exercise the real ``from_pretrained`` loading path without the hub.
"""

from __future__ import annotations

import abc
import logging
import os
import re
import warnings
from typing import Any, Optional

import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    PreTrainedTokenizerFast,
)

from diffusion.utils import Registry

__all__ = ['Blip2Captioner', 'Captioner', 'build_captioner', 'captioners', 'save_tiny_blip2']

log = logging.getLogger(__name__)

_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
# 'owner/name' or 'name' as the hub spells repository ids; anything else that does not exist locally is a bad path.
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$')


class Captioner(abc.ABC):
    """Writes one caption per image.

    Attributes:
        name (str): Identifies the captioner and its weights in the dataset's provenance, e.g. ``'blip2:<path>'``.
    """

    name: str

    @abc.abstractmethod
    def caption(self, images: list[Image.Image]) -> list[str]:
        """Caption ``images``, returning one whitespace-stripped caption per image in the same order."""


def _check_half_precision(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the ops a ViT + OPT forward pass needs run in ``dtype`` on ``device`` (older CPU builds lack some)."""
    try:
        x = torch.randn(2, 3, 8, 8, device=device, dtype=dtype)
        x = torch.nn.functional.conv2d(x, torch.randn(4, 3, 2, 2, device=device, dtype=dtype), stride=2)
        x = torch.nn.functional.linear(x.flatten(1), torch.randn(8, 64, device=device, dtype=dtype))
        x = torch.nn.functional.layer_norm(torch.nn.functional.gelu(x), (8,))
        torch.softmax(x @ x.T, dim=-1).argmax(-1)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _resolve_dtype(device: torch.device, dtype: Optional[str]) -> torch.dtype:
    """Map the ``dtype`` name to a torch dtype, choosing a per-device default when it is ``None``."""
    if dtype is None:
        if device.type == 'cuda':
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f'Unknown captioner dtype {dtype!r}. Valid dtypes: {", ".join(_DTYPES)}.')
    resolved = _DTYPES[dtype]
    if resolved != torch.float32 and device.type == 'cpu' and not _check_half_precision(device, resolved):
        warnings.warn(f'{dtype} is not supported on this CPU; captioning in float32 instead.', stacklevel=3)
        return torch.float32
    return resolved


class Blip2Captioner(Captioner):
    """BLIP-2 captioner built on transformers' ``Blip2ForConditionalGeneration`` and ``Blip2Processor``.

    Args:
        model_name_or_path (str): Local folder or hub id (e.g. ``'Salesforce/blip2-opt-2.7b'``), loaded with
            ``from_pretrained``.
        device (str, optional): Torch device. Default: ``'cuda'`` if available, else ``'cpu'``.
        dtype (str, optional): ``'float32'``, ``'float16'`` or ``'bfloat16'``. Default: ``'bfloat16'`` on GPUs that
            support it, else ``'float16'`` on CUDA, ``'float32'`` on CPU. A half precision the CPU cannot run falls back
            to ``'float32'`` with a warning (recent torch builds run both on CPU, only slowly).
        batch_size (int): Images per ``generate`` call.
        max_new_tokens (int): Most tokens generated per caption.
        num_beams (int): Beam width; 1 is greedy decoding.
        prompt (str, optional): Text that every caption continues (e.g. ``'a photo of'``); it is not part of the
            returned caption.
        seed (int): Seed set before generating, inside a forked RNG so the caller's RNG state is left untouched.
            Greedy and beam search do not sample, so it only matters to captioners built on this one that do.
    """

    def __init__(
        self,
        model_name_or_path: str,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        batch_size: int = 16,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        prompt: Optional[str] = None,
        seed: int = 0,
    ):
        if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
            raise ValueError('batch_size, max_new_tokens and num_beams must all be at least 1.')
        self.model_name_or_path = model_name_or_path
        self.device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        self.dtype = _resolve_dtype(self.device, dtype)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.prompt = prompt.strip() if prompt and prompt.strip() else None
        self.seed = seed
        self.name = f'blip2:{model_name_or_path}'
        self.model, self.processor = self._load(model_name_or_path)

    def _load(self, path: str) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f'BLIP-2 model path {path!r} is a file, not a model folder.')
        if not os.path.exists(path) and not _HUB_ID.match(path):
            raise FileNotFoundError(f'BLIP-2 model folder {path!r} does not exist (and is not a hub id).')
        try:
            # `dtype=` rather than `.to(dtype)`: under float16 transformers then keeps the Q-Former in float32, as
            # BLIP-2 declares it must (bfloat16 has float32's range, so there it is cast like the rest).
            model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=self.dtype, use_safetensors=True)
            # The slow image processor is the preprocessing BLIP-2 checkpoints were evaluated with; the fast one
            # resizes slightly differently. Built by hand because `use_fast` would also apply to the tokenizer.
            image_processor = BlipImageProcessor.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as err:
            raise OSError(f'Could not load a BLIP-2 model from {path!r}: {err}') from err
        config = model.config
        if config.image_token_index is None:
            raise ValueError(f"{path!r} predates transformers' BLIP-2 image-token format (no image_token_index).")
        # Older processor configs lack num_query_tokens; without it a prompt would silently drop the image.
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=config.num_query_tokens)
        if tokenizer.convert_tokens_to_ids(processor.image_token.content) != config.image_token_index:
            raise ValueError(f'The tokenizer of {path!r} does not map its image token to config.image_token_index.')
        model.to(self.device).eval()
        return model, processor

    def _prefix_ids(self, inputs: dict[str, Any]) -> Optional[torch.Tensor]:
        """The ids a decoder-only language model echoes before its new tokens (None for encoder-decoders)."""
        config = self.model.config
        if config.text_config.is_encoder_decoder:
            return None
        if 'input_ids' in inputs:
            return inputs['input_ids']
        # Without text, BLIP-2's generate starts from the query-token placeholders and BOS.
        start = [config.image_token_index] * config.num_query_tokens + [config.text_config.bos_token_id]
        return torch.tensor([start], device=self.device)

    @torch.inference_mode()
    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        text = [self.prompt] * len(images) if self.prompt else None
        inputs = self.processor(images=images, text=text, return_tensors='pt').to(self.device)
        inputs['pixel_values'] = inputs['pixel_values'].to(self.dtype)
        ids = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
        )
        # Decoder-only models return the prompt ids too in recent transformers; older versions returned only the
        # new tokens, hence the comparison rather than an unconditional slice.
        prefix = self._prefix_ids(inputs)
        echoed = prefix is not None and ids.shape[1] >= prefix.shape[1]
        echoed = echoed and bool((ids[:, : prefix.shape[1]] == prefix).all())
        if echoed:
            ids = ids[:, prefix.shape[1] :]
        captions = [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]
        if self.prompt and not echoed:
            captions = [c[len(self.prompt) :].strip() if c.startswith(self.prompt) else c for c in captions]
        return captions

    def caption(self, images: list[Image.Image]) -> list[str]:
        """Caption ``images`` in batches of ``batch_size``; any PIL mode is converted to RGB first."""
        images = [im if im.mode == 'RGB' else im.convert('RGB') for im in images]
        cuda_ids = []
        if self.device.type == 'cuda':
            cuda_ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        captions: list[str] = []
        with torch.random.fork_rng(devices=cuda_ids):
            torch.manual_seed(self.seed)
            for start in range(0, len(images), self.batch_size):
                captions.extend(self._caption_batch(images[start : start + self.batch_size]))
        return captions


captioners = Registry('captioners', 'image captioners for the caption stage')
captioners.register('blip2', func=Blip2Captioner)


def build_captioner(name: str, **kwargs: Any) -> Captioner:
    """Build the captioner registered as ``name``; unknown names or keyword names raise a ``ValueError``.

    Args:
        name (str): Registered name, e.g. ``'blip2'``.
        **kwargs: Constructor arguments of that captioner.
    """
    return captioners.build(name, kwargs)


# Caption-like words: a word-level vocabulary keeps the tiny model's random captions readable.
_TINY_WORDS = (
    'a an the of in on with and at by near under over two three small large red green blue white black brown '
    'yellow dog cat bird horse tree flower house car boat street road field sky water sea river mountain city '
    'person man woman child people photo picture painting view building bridge beach forest park garden table '
    'chair window door wall grass snow cloud sun light night old new wooden stone sitting standing walking '
    'close up front top background colorful bright dark'
).split()
_TINY_SPECIALS = ['<pad>', '</s>', '<unk>', '<image>']


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level OPT-style tokenizer (``</s>`` as BOS and EOS, ``<image>`` placeholder) built without the hub."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(_TINY_SPECIALS + _TINY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token='<unk>'))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # OPT prepends BOS to every text; BLIP-2's processor puts the image placeholders before it.
    tok.post_processor = processors.TemplateProcessing(single='</s> $A', special_tokens=[('</s>', vocab['</s>'])])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _TINY_SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token='</s>', eos_token='</s>', pad_token='<pad>', unk_token='<unk>'
    )


def save_tiny_blip2(path: str, seed: int = 0) -> str:
    """Save a tiny random-weight BLIP-2 (model, image processor, tokenizer) to ``path`` and return ``path``.

    The same ``seed`` gives identical weights. Weights are initialised with a larger spread than BLIP-2's defaults
    (whose vision tower starts at std 1e-10) so that captions depend on the image and greedy decoding is not decided
    by rounding noise.

    Args:
        path (str): Output folder, created if missing.
        seed (int): Seed of the random weights.
    """
    tokenizer = _tiny_tokenizer()
    vocab_size, std, image_size = len(tokenizer), 0.2, 32
    config = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
            initializer_range=std,
        ),
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=vocab_size,
            max_position_embeddings=64,
            initializer_range=std,
        ),
        text_config=dict(
            model_type='opt',
            vocab_size=vocab_size,
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            init_std=std,
            # Tied input/output embeddings make a random model repeat its last input token (BOS = EOS: empty captions).
            tie_word_embeddings=False,
        ),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids('<image>'),
        initializer_range=std,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessor(size={'height': image_size, 'width': image_size})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=config.num_query_tokens)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
