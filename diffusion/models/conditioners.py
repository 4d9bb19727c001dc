"""Text conditioners: captions -> tokens -> the conditioning a denoiser takes.

A :class:`TextConditioner` answers for everything text in a diffusion model: its tokenizers and encoders (held on
the model under the names a diffusers pipeline gives them, ``text_encoder``, ``tokenizer_2``, ..., so that
checkpoints and pipelines see the usual names), the batch keys it reads (captions, token ids or precomputed
embeddings), the columns precompute stores, the unconditional input that caption dropout trains, the pipeline class
that samples with it, and the sampling arguments that pipeline takes. It returns a conditioning dict with the
keys of :data:`diffusion.data.batch.CONDITIONING_KEYS` (``text_embeds``, and where the family has them
``pooled_text_embeds``, ``time_ids``, ``text_attention_mask``); the denoiser maps that dict to its network's
arguments. A new encoder family (T5) is a subclass here plus a line in
:data:`diffusion.models.registries.text_conditioners`.

Two conditioners are built on transformers' CLIP text models and diffusers' pipelines:

- :class:`CLIPTextConditioner` (SD1/SD2): one CLIP, its last hidden state, caption dropout to the empty caption's
  tokens (or its embedding, encoded once, when the batch holds precomputed embeddings), as SD2 was trained.
- :class:`SDXLTextConditioner`: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with projection, both penultimate hidden
  states concatenated (768 + 1280 = 2048), the second's pooled projection, and SDXL's micro-conditioning (original
  size, crop top-left, target size as six ``time_ids``), exactly as ``StableDiffusionXLPipeline.encode_prompt`` and
  ``_get_add_time_ids`` compute them. Caption dropout zeroes both embeddings, the input the SDXL pipeline feeds
  for an empty negative prompt (``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

from typing import Any, Collection, Optional, Sequence

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from torch import nn

from diffusion.data.batch import MICRO_CONDITIONING_KEYS
from diffusion.data.tokens import padded_token_ids
from diffusion.models.text_encoders import EOS_TOKEN, build_clip_tokenizer, build_text_encoder

__all__ = ['CLIPTextConditioner', 'SDXLTextConditioner', 'TextConditioner', 'clip', 'sdxl_clip']


def _tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Token ids (B, L) padded to the tokenizer's maximum length, as the SD pipelines pad them."""
    return padded_token_ids(tokenizer, captions)


class TextConditioner:
    """Interface of a text conditioner; see the module docstring.

    Args:
        components (dict[str, Any]): The encoders and tokenizers by pipeline component name.
        caption_drop_prob (float): Fraction of training rows made unconditional, which teaches the unconditional
            prediction that classifier-free guidance uses. Default: ``0.0``.
        train_text_encoder (bool): Train the encoders too. Default: ``False``.
    """

    #: The diffusers pipeline that samples with this conditioner's components.
    pipeline_class: type = StableDiffusionPipeline
    #: Columns of :meth:`text_embeddings`, stored by precompute and read back by training.
    embedding_columns: tuple[str, ...] = ('text_embeds',)
    #: Further batch columns the conditioning reads and precompute stores (SDXL's micro-conditioning).
    extra_columns: tuple[str, ...] = ()
    #: Whether :attr:`pipeline_class` decodes with the VAE's ``shift_factor`` (SD3's does; SD's and SDXL's do not).
    pipeline_applies_shift_factor: bool = False

    def __init__(self, components: dict[str, Any], caption_drop_prob: float = 0.0, train_text_encoder: bool = False):
        if not 0.0 <= caption_drop_prob <= 1.0:
            raise ValueError(f'caption_drop_prob must be in [0, 1], got {caption_drop_prob}.')
        self.caption_drop_prob = caption_drop_prob
        self._components = dict(components)
        self.train_text_encoder = train_text_encoder
        self._owner: Optional[nn.Module] = None
        for module in self.encoders():
            module.requires_grad_(train_text_encoder)

    # -- the components, held by the model ------------------------------------------------------------------------
    def components(self) -> dict[str, Any]:
        """Encoders and tokenizers by the name the model and the diffusers pipeline give them."""
        if self._owner is None:
            return dict(self._components)
        return {name: getattr(self._owner, name) for name in self._components}

    def attach(self, owner: nn.Module) -> None:
        """Hand the components to ``owner`` (the model), which holds them from now on; they are read back from it,
        so a wrapper set on the model later (FSDP, compile) is the one that runs."""
        for name, component in self._components.items():
            setattr(owner, name, component)
        self._components = dict.fromkeys(self._components)
        self._owner = owner

    def _get(self, name: str) -> Any:
        return getattr(self._owner, name) if self._owner is not None else self._components[name]

    def encoders(self) -> list[nn.Module]:
        """The text encoders (the components that are modules)."""
        return [c for c in self.components().values() if isinstance(c, nn.Module)]

    @property
    def tokenizer(self) -> Any:
        """The first tokenizer; the image-caption dataloader tokenizes with it in its workers (``input_ids``)."""
        return self._get('tokenizer')

    # -- text -> conditioning -------------------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids of ``captions`` under their batch keys (``input_ids``, ...)."""
        raise NotImplementedError

    def encode(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Embeddings of token ids, under :attr:`embedding_columns`."""
        raise NotImplementedError

    def text_embeddings(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The columns that precompute stores for ``captions``."""
        return self.encode(self.tokenize(captions))

    def conditioning(self, batch: dict[str, Any], drop_captions: bool, image_size: tuple[int, int]) -> dict:
        """The denoiser's conditioning for ``batch``; a ``caption_drop_prob`` fraction of rows is made
        unconditional when ``drop_captions``. ``image_size`` is (height, width) of the training images."""
        raise NotImplementedError

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of the conditioning, for counting the denoiser's FLOPs."""
        raise NotImplementedError

    # -- caption dropout ------------------------------------------------------------------------------------------
    def drop_mask(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Which rows lose their caption: one draw of the global RNG per batch."""
        return torch.rand(batch_size, device=device) < self.caption_drop_prob

    def _check_precomputed(self, batch: dict[str, Any]) -> None:
        if self.train_text_encoder:
            raise ValueError('Precomputed text_embeds cannot train the text encoder; set train_text_encoder=false.')
        missing = [c for c in self.embedding_columns if c not in batch]
        if missing:
            raise KeyError(
                f'Batches of precomputed text embeddings for {type(self).__name__} need {list(self.embedding_columns)}'
                f' (precompute them with this model); the batch lacks {missing} and has {sorted(batch)}.'
            )

    # -- sampling -------------------------------------------------------------------------------------------------
    def pipeline_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :attr:`pipeline_class` besides the model's components and the scheduler."""
        return {}

    def pipeline_prompt_kwargs(
        self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]], num_images_per_prompt: int
    ) -> dict[str, Any]:
        """How the pipeline call gets the prompts: as text, which the pipeline encodes itself (this default), or as
        embeddings this conditioner computes (when the pipeline would encode them otherwise than training does)."""
        return {
            'prompt': list(prompts),
            'negative_prompt': None if negative_prompts is None else list(negative_prompts),
            'num_images_per_prompt': num_images_per_prompt,
        }

    def pipeline_call_kwargs(self, **conditioning: Any) -> dict[str, Any]:
        """Sampling arguments this conditioner adds to the pipeline call; unknown names are refused."""
        if conditioning:
            raise TypeError(f'generate got unexpected arguments {sorted(conditioning)} for {type(self).__name__}.')
        return {}


class CLIPTextConditioner(TextConditioner):
    """One CLIP text encoder's last hidden state, no attention mask (SD1/SD2).

    Args:
        text_encoder (CLIPTextModel): The encoder.
        tokenizer (CLIPTokenizer): Its tokenizer (SD2 pads with ``'!'``).
        caption_drop_prob (float): Fraction of training captions replaced by the empty caption. Default: ``0.0``.
        train_text_encoder (bool): Train the encoder too. Default: ``False``.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer: Any, **kwargs: Any):
        super().__init__({'text_encoder': text_encoder, 'tokenizer': tokenizer}, **kwargs)
        self._empty_text_embeds: Optional[torch.Tensor] = None  # encoded once, for dropout on text_embeds
        self._empty_input_ids: Optional[torch.Tensor] = None  # tokenized once, for dropout on input_ids

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return {'input_ids': _tokenize(self.tokenizer, captions)}

    def encode(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``text_embeds`` (B, L, D): the encoder's last hidden state."""
        encoder = self._get('text_encoder')
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            return {'text_embeds': encoder(tokens['input_ids'].to(encoder.device))[0]}

    def drop_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Replace a ``caption_drop_prob`` fraction of rows by the empty caption's tokens, so that a trained
        encoder learns the unconditional input too."""
        mask = self.drop_mask(input_ids.shape[0], input_ids.device)
        if self._empty_input_ids is None:  # tokenized once, not on every step
            self._empty_input_ids = self.tokenize([''])['input_ids']
        empty = self._empty_input_ids.to(input_ids.device).expand_as(input_ids)
        return torch.where(mask[:, None], empty, input_ids)

    def drop_text_embeds(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """Replace a ``caption_drop_prob`` fraction of rows by the empty caption's embedding (encoded once)."""
        mask = self.drop_mask(text_embeds.shape[0], text_embeds.device)
        if self._empty_text_embeds is None:
            with torch.no_grad():
                self._empty_text_embeds = self.text_embeddings([''])['text_embeds']
        empty = self._empty_text_embeds.to(text_embeds.device, text_embeds.dtype).expand_as(text_embeds)
        return torch.where(mask[:, None, None], empty, text_embeds)

    def conditioning(self, batch: dict[str, Any], drop_captions: bool, image_size: tuple[int, int]) -> dict:
        drop = drop_captions and self.caption_drop_prob > 0
        if 'text_embeds' in batch:
            self._check_precomputed(batch)
            text_embeds = batch['text_embeds']
            return {'text_embeds': self.drop_text_embeds(text_embeds) if drop else text_embeds}
        input_ids = batch['input_ids'] if 'input_ids' in batch else self.tokenize(batch['captions'])['input_ids']
        return self.encode({'input_ids': self.drop_input_ids(input_ids) if drop else input_ids})

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        return {'text_embeds': (self.tokenizer.model_max_length, self._get('text_encoder').config.hidden_size)}

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {'safety_checker': None, 'feature_extractor': None, 'requires_safety_checker': False}


class SDXLTextConditioner(TextConditioner):
    """SDXL's two CLIP encoders, pooled embedding and micro-conditioning; see the module docstring.

    Args:
        text_encoder (CLIPTextModel): CLIP ViT-L/14 text tower.
        text_encoder_2 (CLIPTextModelWithProjection): OpenCLIP ViT-bigG/14 text tower with projection.
        tokenizer (CLIPTokenizer): Tokenizer of ``text_encoder`` (pads with the end token).
        tokenizer_2 (CLIPTokenizer): Tokenizer of ``text_encoder_2`` (pads with ``'!'``).
        caption_drop_prob (float): Fraction of training rows made unconditional (zeros). Default: ``0.0``.
        train_text_encoder (bool): Train both encoders too. Default: ``False``.
    """

    pipeline_class = StableDiffusionXLPipeline
    embedding_columns = ('text_embeds', 'pooled_text_embeds')
    extra_columns = MICRO_CONDITIONING_KEYS

    def __init__(
        self,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        tokenizer: Any,
        tokenizer_2: Any,
        **kwargs: Any,
    ):
        components = {
            'text_encoder': text_encoder,
            'text_encoder_2': text_encoder_2,
            'tokenizer': tokenizer,
            'tokenizer_2': tokenizer_2,
        }
        super().__init__(components, **kwargs)

    @property
    def context_dim(self) -> int:
        """Width of the concatenated hidden states (the denoiser's cross-attention width)."""
        return self._get('text_encoder').config.hidden_size + self._get('text_encoder_2').config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self._get('text_encoder_2').config.projection_dim

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return {
            'input_ids': _tokenize(self._get('tokenizer'), captions),
            'input_ids_2': _tokenize(self._get('tokenizer_2'), captions),
        }

    def encode(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``text_embeds`` (B, 77, D1 + D2): both penultimate hidden states; ``pooled_text_embeds`` (B, P)."""
        first_encoder, second_encoder = self._get('text_encoder'), self._get('text_encoder_2')
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            first = first_encoder(tokens['input_ids'].to(first_encoder.device), output_hidden_states=True)
            second = second_encoder(tokens['input_ids_2'].to(second_encoder.device), output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return {'text_embeds': context, 'pooled_text_embeds': second.text_embeds}

    def _embeddings(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if 'text_embeds' in batch:
            self._check_precomputed(batch)
            return {column: batch[column] for column in self.embedding_columns}
        if 'input_ids' in batch and 'input_ids_2' in batch:
            return self.encode({'input_ids': batch['input_ids'], 'input_ids_2': batch['input_ids_2']})
        if 'captions' in batch:
            return self.text_embeddings(batch['captions'])
        raise KeyError(
            'SDXL batches need "captions", "input_ids" and "input_ids_2", or "text_embeds" and "pooled_text_embeds";'
            f' the batch has {sorted(batch)}.'
        )

    def time_ids(self, batch: dict[str, Any], batch_size: int, image_size: tuple[int, int], device) -> torch.Tensor:
        """The added time ids (B, 6): original size, crop top-left, target size, each (height, width).

        Missing keys default to an uncropped image of the training size ``image_size``.
        """
        size = torch.tensor(image_size, device=device)
        defaults = {
            'cond_original_size': size,
            'cond_crops_coords_top_left': torch.zeros(2, dtype=size.dtype, device=device),
            'cond_target_size': size,
        }
        parts = []
        for key in MICRO_CONDITIONING_KEYS:
            value = batch.get(key)
            value = defaults[key].expand(batch_size, 2) if value is None else torch.as_tensor(value)
            if value.shape != (batch_size, 2):
                raise ValueError(f'Batch key {key!r} must have shape ({batch_size}, 2), got {tuple(value.shape)}.')
            parts.append(value.to(device, torch.float32))
        return torch.cat(parts, dim=1)

    def conditioning(self, batch: dict[str, Any], drop_captions: bool, image_size: tuple[int, int]) -> dict:
        out = self._embeddings(batch)
        context, pooled = out['text_embeds'], out['pooled_text_embeds'].to(out['text_embeds'].device)
        if drop_captions and self.caption_drop_prob > 0:
            keep = (~self.drop_mask(context.shape[0], context.device)).to(context.dtype)
            context = context * keep[:, None, None]
            pooled = pooled * keep[:, None].to(pooled.dtype)
        time_ids = self.time_ids(batch, context.shape[0], image_size, context.device)
        return {'text_embeds': context, 'pooled_text_embeds': pooled, 'time_ids': time_ids}

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        length = self._get('tokenizer').model_max_length
        return {'text_embeds': (length, self.context_dim), 'pooled_text_embeds': (self.pooled_dim,), 'time_ids': (6,)}

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {'force_zeros_for_empty_prompt': True, 'add_watermarker': False}

    def pipeline_call_kwargs(
        self,
        original_size: Optional[Sequence[int]] = None,
        crops_coords_top_left: Sequence[int] = (0, 0),
        target_size: Optional[Sequence[int]] = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """SDXL's sampling conditioning, each (height, width) / (top, left); sizes default to the output size."""
        super().pipeline_call_kwargs(**kwargs)  # rejects unknown names
        return {
            'original_size': None if original_size is None else tuple(int(v) for v in original_size),
            'crops_coords_top_left': tuple(int(v) for v in crops_coords_top_left),
            'target_size': None if target_size is None else tuple(int(v) for v in target_size),
        }


def _encoder(name: str, config: Optional[dict], pretrained: Optional[str], projection: bool = False) -> nn.Module:
    # use_safetensors=True: a pickled .bin, which runs code when loaded, is refused.
    if pretrained is not None:
        return build_text_encoder(
            pretrained=pretrained, subfolder=name, use_safetensors=True, with_projection=projection
        )
    if config is None:
        raise ValueError(f'{name} needs a config (CLIPTextConfig fields) or to be loaded from a pretrained folder.')
    return build_text_encoder(config, with_projection=projection)


def set_tokens_per_caption(tokenizer: Any, length: Optional[int], encoder: nn.Module, key: str) -> None:
    """Pad and truncate ``tokenizer``'s captions to ``length`` tokens (``model_max_length``, which is saved with
    the tokenizer, so an exported pipeline pads the same way); ``None`` keeps the tokenizer's own. ``key`` names
    the config key in the error when ``length`` is outside 3 .. the encoder's ``max_position_embeddings``."""
    if length is None:
        return
    positions = encoder.config.max_position_embeddings
    if not 2 < length <= positions:
        raise ValueError(f"{key} must be between 3 and the text encoder's {positions} positions, got {length}.")
    tokenizer.model_max_length = length


def clip(
    text_encoder_config: Optional[dict] = None,
    *,
    pretrained: Optional[str] = None,
    load: Collection[str] = (),
    tokenizer_pad_token: str = '!',
    tokenizer_max_length: Optional[int] = None,
    caption_drop_prob: float = 0.0,
    train_text_encoder: bool = False,
) -> CLIPTextConditioner:
    """SD2's conditioner: a ``CLIPTextModel`` and the CLIP tokenizer, each built or loaded from ``pretrained``.

    Args:
        text_encoder_config (dict, optional): ``CLIPTextConfig`` fields, when the encoder is not loaded.
        pretrained (str, optional): A diffusers pipeline folder or hub id.
        load (Collection[str]): Which of ``text_encoder`` and ``tokenizer`` to load from ``pretrained``.
        tokenizer_pad_token (str): Pad token of the offline tokenizer. Default: ``'!'`` (SD2).
        tokenizer_max_length (int, optional): Tokens per caption, padded or truncated to it, instead of the
            tokenizer's own (77 for CLIP). Short captions need fewer: the encoder and every cross-attention then
            work on fewer tokens. It is saved with the tokenizer, so an exported pipeline pads to it as well.
            At most the encoder's ``max_position_embeddings``. Default: ``None`` (the tokenizer's).
        caption_drop_prob, train_text_encoder: See :class:`TextConditioner`.
    """
    root = pretrained
    encoder = _encoder('text_encoder', text_encoder_config, root if 'text_encoder' in load else None)
    tokenizer = (
        build_clip_tokenizer(root, subfolder='tokenizer')
        if root is not None and 'tokenizer' in load
        else build_clip_tokenizer(pad_token=tokenizer_pad_token)
    )
    set_tokens_per_caption(tokenizer, tokenizer_max_length, encoder, 'model.tokenizer_max_length')
    return CLIPTextConditioner(
        encoder, tokenizer, caption_drop_prob=caption_drop_prob, train_text_encoder=train_text_encoder
    )


def sdxl_clip(
    text_encoder_config: Optional[dict] = None,
    text_encoder_2_config: Optional[dict] = None,
    *,
    pretrained: Optional[str] = None,
    load: Collection[str] = (),
    caption_drop_prob: float = 0.0,
    train_text_encoder: bool = False,
) -> SDXLTextConditioner:
    """SDXL's conditioner: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (with projection) and their tokenizers.

    Args:
        text_encoder_config (dict, optional): ``CLIPTextConfig`` fields of the first tower.
        text_encoder_2_config (dict, optional): ``CLIPTextConfig`` fields of the second tower (with projection).
        pretrained (str, optional): A diffusers SDXL pipeline folder or hub id.
        load (Collection[str]): Which of ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2`` to load.
        caption_drop_prob, train_text_encoder: See :class:`TextConditioner`.
    """
    root = pretrained
    first = _encoder('text_encoder', text_encoder_config, root if 'text_encoder' in load else None)
    second = _encoder('text_encoder_2', text_encoder_2_config, root if 'text_encoder_2' in load else None, True)
    # SDXL's CLIP-L tokenizer pads with the end token, the bigG one with '!'.
    tokenizers = {
        name: build_clip_tokenizer(root, subfolder=name)
        if root is not None and name in load
        else build_clip_tokenizer(pad_token=pad)
        for name, pad in (('tokenizer', EOS_TOKEN), ('tokenizer_2', '!'))
    }
    return SDXLTextConditioner(
        first,
        second,
        tokenizers['tokenizer'],
        tokenizers['tokenizer_2'],
        caption_drop_prob=caption_drop_prob,
        train_text_encoder=train_text_encoder,
    )
