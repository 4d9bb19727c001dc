"""Text conditioners with T5: T5 alone (``t5``) and SD3's two CLIPs + T5 (``sd3``).

Built on transformers (``T5EncoderModel``, ``CLIPTextModelWithProjection``, their tokenizers) and on diffusers'
pipelines for sampling; the shared machinery (components held by the model, caption dropout, precomputed columns)
is :class:`~diffusion.models.conditioners.TextConditioner`'s.

T5 runs with its attention mask (padding is masked out of every layer) and its output is zeroed at padded
positions, so the conditioning does not depend on what the pad tokens are; ``max_length`` tokens per caption
(SD3: 256). Diffusers' SD3 pipeline runs T5 without a mask; so that sampling sees exactly the conditioning that
training saw, :meth:`pipeline_prompt_kwargs` hands the pipeline the embeddings these classes compute
(``prompt_embeds``, ...) instead of the prompts. ``use_attention_mask: false`` runs T5 as diffusers does.

- :class:`T5TextConditioner`: ``text_embeds`` (B, max_length, d_model); a UNet's cross-attention context, sampled
  through ``StableDiffusionPipeline``.
- :class:`SD3TextConditioner`: as SD3's ``encode_prompt``: CLIP-L's and CLIP-G's penultimate hidden states
  concatenated on the channel axis (768 + 1280), zero-padded to T5's width and concatenated with T5's tokens on
  the sequence axis (77, or ``clip_max_length``, + max_length tokens); ``pooled_text_embeds`` = both CLIPs'
  projected pooled outputs concatenated (768 + 1280 = 2048). Sampled through ``StableDiffusion3Pipeline``.

Caption dropout replaces a row's captions by the empty caption (all tokenizers), whose embedding is also what
sampling uses for an empty negative prompt.
"""

from __future__ import annotations

import hashlib
from typing import Any, Collection, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from torch import nn

from diffusion.models.conditioners import TextConditioner, _tokenize, set_tokens_per_caption
from diffusion.models.t5 import T5_XXL_ENCODER_CONFIG, TINY_T5_CONFIG, build_t5_encoder, build_t5_tokenizer
from diffusion.models.text_encoders import (
    EOS_TOKEN,
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
    build_clip_tokenizer,
    build_text_encoder,
)
from diffusion.utils import ConfigError

__all__ = ['SD3TextConditioner', 'T5TextConditioner', 'sd3', 't5']

# SD3's CLIP-L: ViT-L/14's text tower with its 768-wide projection.
SD3_CLIP_L_CONFIG = dict(SDXL_TEXT_ENCODER_CONFIG, projection_dim=768)
SD3_CLIP_G_CONFIG = SDXL_TEXT_ENCODER_2_CONFIG
_TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
PRESETS = {
    'sd3': {'clip_l': SD3_CLIP_L_CONFIG, 'clip_g': SD3_CLIP_G_CONFIG, 't5': T5_XXL_ENCODER_CONFIG},
    'tiny': {
        'clip_l': dict(SD3_CLIP_L_CONFIG, **_TINY_CLIP),
        'clip_g': dict(SD3_CLIP_G_CONFIG, **_TINY_CLIP),
        't5': TINY_T5_CONFIG,
    },
}


def _t5_hidden_states(encoder: nn.Module, input_ids: torch.Tensor, pad_id: int, masked: bool) -> torch.Tensor:
    """T5's last hidden state (B, L, D); with ``masked``, padding is masked in attention and zeroed in the output."""
    input_ids = input_ids.to(encoder.device)
    if not masked:
        return encoder(input_ids)[0]
    mask = (input_ids != pad_id).long()
    hidden = encoder(input_ids, attention_mask=mask)[0]
    return hidden * mask[..., None].to(hidden.dtype)


def t5_encoder_record(encoder: nn.Module) -> str:
    """What identifies a T5 encoder's embeddings in precomputed shards: its name (hub id or folder, when loaded),
    shape, and a digest of a few of its weights rounded to bf16 (so an encoder that ran in bf16 and the same one in
    fp32 agree, while other weights, even of the same shape, do not)."""
    config = encoder.config
    name = getattr(config, 'name_or_path', '') or 'built'
    digest = hashlib.sha256()
    for weight in (encoder.shared.weight[:16], encoder.encoder.final_layer_norm.weight):
        if weight.is_meta:  # built on meta for sharding: the shape alone is known
            return f'{name} d_model={config.d_model} layers={config.num_layers}'
        digest.update(weight.detach().to('cpu', torch.bfloat16).float().numpy().tobytes())
    return f'{name} d_model={config.d_model} layers={config.num_layers} sha256:{digest.hexdigest()[:16]}'


class _EmbeddingPrompts:
    """Caption dropout on tokens and sampling from embeddings, shared by the two conditioners.

    Precomputed shards hold T5's states trimmed to each caption's tokens (``t5_embeds``, (L_i, D); with a masked
    T5 the positions after them are zeros, so nothing is lost) with ``t5_max_length`` and ``t5_encoder``
    (:func:`t5_encoder_record`); the latents dataset pads them back with zeros and gives ``t5_attention_mask``, and
    :meth:`check_precomputed_record` refuses shards of another encoder or length before training.
    """

    def _drop_tokens(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = next(iter(tokens.values()))
        mask = self.drop_mask(first.shape[0], first.device)
        empty = getattr(self, '_empty_tokens', None)
        if empty is None:  # tokenized once, not on every step
            empty = self._empty_tokens = self.tokenize([''])
        return {k: torch.where(mask[:, None], empty[k].to(v.device).expand_as(v), v) for k, v in tokens.items()}

    def _drop_embeddings(self, embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = embeddings['text_embeds']
        mask = self.drop_mask(first.shape[0], first.device)
        if self._empty is None:
            with torch.no_grad():
                self._empty = self.text_embeddings([''])
        out = {}
        for key, value in embeddings.items():
            empty = self._empty[key].to(value.device, value.dtype).expand_as(value)
            out[key] = torch.where(mask.view(-1, *([1] * (value.ndim - 1))), empty, value)
        return out

    def _t5(self) -> tuple[nn.Module, Any]:
        raise NotImplementedError

    @property
    def max_length(self) -> int:
        """T5 tokens per caption."""
        return int(self._t5()[1].model_max_length)

    def stored_columns(self) -> dict[str, str]:
        """The MDS columns precompute writes for the text (name -> encoding)."""
        columns = dict.fromkeys((*self._stored_embeddings, 't5_embeds'), 'ndarray')
        return {**columns, 't5_max_length': 'int', 't5_encoder': 'str'}

    def stored_text_columns(self, captions: Sequence[str]) -> dict[str, list[Any]]:
        """Per caption, the values of :meth:`stored_columns`: T5's states cut to the caption's real tokens (all
        ``max_length`` of them when T5 runs unmasked, whose padded positions carry information)."""
        encoder, tokenizer = self._t5()
        tokens = self.tokenize(captions)
        embeddings = self.encode(tokens)
        t5_ids = tokens[self._t5_ids]
        width = self.max_length
        lengths = (t5_ids != tokenizer.pad_token_id).sum(dim=1) if self.use_attention_mask else [width] * len(t5_ids)
        t5_states = embeddings['text_embeds'][:, -width:]
        out: dict[str, list[Any]] = {k: list(v) for k, v in self._split_stored(embeddings).items()}
        out['t5_embeds'] = [t5_states[i, : int(n)] for i, n in enumerate(lengths)]
        out['t5_max_length'] = [width] * len(captions)
        out['t5_encoder'] = [t5_encoder_record(encoder)] * len(captions)
        return out

    def _split_stored(self, embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def check_precomputed_record(self, record: dict[str, Any], where: str) -> None:
        """Refuse, in one line naming the key, shards whose T5 states another encoder or length produced."""
        if record.get('t5_max_length') is None:
            return
        if int(record['t5_max_length']) != self.max_length:
            raise ConfigError(
                f'Invalid model.max_length={self.max_length}: {where}.remote holds T5 embeddings precomputed for '
                f'{record["t5_max_length"]} tokens per caption; set model.max_length={record["t5_max_length"]} or '
                'precompute the shards again with this model.'
            )
        mine = t5_encoder_record(self._t5()[0])
        theirs = str(record.get('t5_encoder'))
        same = theirs == mine or ('sha256:' not in mine and theirs.startswith(mine + ' '))
        if not same:
            raise ConfigError(
                f'Invalid {where}.remote: its T5 embeddings were precomputed with the encoder {theirs!r}, this model '
                f'(model.text_conditioner) has {mine!r}; precompute the shards again with this model.'
            )

    def _from_stored(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The conditioning of a batch of precomputed columns (``t5_embeds`` padded back by the dataset)."""
        t5_states = batch['t5_embeds']
        if t5_states.shape[1] != self.max_length:
            raise ConfigError(
                f'Invalid model.max_length={self.max_length}: the batch holds T5 embeddings padded to '
                f'{t5_states.shape[1]} tokens; precompute the shards again with this model.'
            )
        return self._assemble(batch)

    def conditioning(self, batch: dict[str, Any], drop_captions: bool, image_size: tuple[int, int]) -> dict:
        drop = drop_captions and self.caption_drop_prob > 0
        if 't5_embeds' in batch:
            if self.train_text_encoder:
                raise ValueError(
                    'Precomputed T5 embeddings cannot train the text encoder; set train_text_encoder=false.'
                )
            embeddings = self._from_stored(batch)
            return self._drop_embeddings(embeddings) if drop else embeddings
        if 'text_embeds' in batch:
            self._check_precomputed(batch)
            embeddings = {column: batch[column] for column in self.embedding_columns}
            return self._drop_embeddings(embeddings) if drop else embeddings
        tokens = self._batch_tokens(batch)
        return self.encode(self._drop_tokens(tokens) if drop else tokens)

    def pipeline_prompt_kwargs(
        self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]], num_images_per_prompt: int
    ) -> dict[str, Any]:
        negative_prompts = list(negative_prompts) if negative_prompts is not None else [''] * len(prompts)
        with torch.no_grad():
            positive, negative = self.text_embeddings(prompts), self.text_embeddings(negative_prompts)
        return self._embedding_kwargs(positive, negative, num_images_per_prompt)

    def export_kwargs(self) -> dict[str, Any]:
        """What an export records beside the pipeline's configs, which have no place for it (T5's mask); the
        loader hands it back to the constructor (:mod:`diffusion.inference.loading`)."""
        return {'use_attention_mask': self.use_attention_mask}


class T5TextConditioner(_EmbeddingPrompts, TextConditioner):
    """A T5 encoder's last hidden state, padding masked; see the module docstring.

    Args:
        text_encoder (T5EncoderModel): The encoder.
        tokenizer (T5TokenizerFast): Its tokenizer; ``model_max_length`` tokens per caption.
        use_attention_mask (bool): Mask and zero the padding (default), or run T5 on it as SD3's pipeline does.
            Default: ``True``.
        caption_drop_prob, train_text_encoder: See :class:`~diffusion.models.conditioners.TextConditioner`.
    """

    pipeline_class = StableDiffusionPipeline

    def __init__(self, text_encoder: nn.Module, tokenizer: Any, use_attention_mask: bool = True, **kwargs: Any):
        super().__init__({'text_encoder': text_encoder, 'tokenizer': tokenizer}, **kwargs)
        self.use_attention_mask = use_attention_mask
        self._empty: Optional[dict[str, torch.Tensor]] = None

    _stored_embeddings: tuple[str, ...] = ()
    _t5_ids = 'input_ids'

    def _t5(self) -> tuple[nn.Module, Any]:
        return self._get('text_encoder'), self.tokenizer

    def _assemble(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {'text_embeds': batch['t5_embeds']}

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return {'input_ids': _tokenize(self.tokenizer, captions)}

    def _batch_tokens(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {'input_ids': batch['input_ids']} if 'input_ids' in batch else self.tokenize(batch['captions'])

    def encode(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``text_embeds`` (B, max_length, d_model)."""
        encoder = self._get('text_encoder')
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            hidden = _t5_hidden_states(
                encoder, tokens['input_ids'], self.tokenizer.pad_token_id, self.use_attention_mask
            )
        return {'text_embeds': hidden}

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        return {'text_embeds': (self.tokenizer.model_max_length, self._get('text_encoder').config.d_model)}

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {'safety_checker': None, 'feature_extractor': None, 'requires_safety_checker': False}

    def _embedding_kwargs(self, positive: dict, negative: dict, num_images_per_prompt: int) -> dict[str, Any]:
        # StableDiffusionPipeline repeats given embeddings num_images_per_prompt times itself.
        return {
            'prompt_embeds': positive['text_embeds'],
            'negative_prompt_embeds': negative['text_embeds'],
            'num_images_per_prompt': num_images_per_prompt,
        }


class SD3TextConditioner(_EmbeddingPrompts, TextConditioner):
    """SD3's CLIP-L, CLIP-G (both with projection) and T5; see the module docstring.

    Args:
        text_encoder (CLIPTextModelWithProjection): CLIP ViT-L/14 text tower.
        text_encoder_2 (CLIPTextModelWithProjection): OpenCLIP ViT-bigG/14 text tower.
        text_encoder_3 (T5EncoderModel): T5 v1.1 XXL encoder.
        tokenizer, tokenizer_2 (CLIPTokenizer): The CLIP tokenizers (77 tokens, or ``model_max_length``).
        tokenizer_3 (T5TokenizerFast): T5's tokenizer; ``model_max_length`` tokens per caption.
        use_attention_mask (bool): Mask and zero T5's padding. Default: ``True``.
        caption_drop_prob, train_text_encoder: See :class:`~diffusion.models.conditioners.TextConditioner`.
    """

    pipeline_class = StableDiffusion3Pipeline
    pipeline_applies_shift_factor = True
    embedding_columns = ('text_embeds', 'pooled_text_embeds')

    def __init__(
        self,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        text_encoder_3: nn.Module,
        tokenizer: Any,
        tokenizer_2: Any,
        tokenizer_3: Any,
        use_attention_mask: bool = True,
        **kwargs: Any,
    ):
        components = {
            'text_encoder': text_encoder,
            'text_encoder_2': text_encoder_2,
            'text_encoder_3': text_encoder_3,
            'tokenizer': tokenizer,
            'tokenizer_2': tokenizer_2,
            'tokenizer_3': tokenizer_3,
        }
        super().__init__(components, **kwargs)
        self.use_attention_mask = use_attention_mask
        self._empty: Optional[dict[str, torch.Tensor]] = None
        clip_width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        if clip_width > text_encoder_3.config.d_model:
            raise ConfigError(
                f'Invalid model.text_conditioner: the CLIP hidden states ({clip_width} wide together) must fit in '
                f"T5's width (d_model {text_encoder_3.config.d_model}), which they are zero-padded to."
            )

    _stored_embeddings = ('clip_embeds', 'pooled_text_embeds')
    _t5_ids = 'input_ids_3'

    def _t5(self) -> tuple[nn.Module, Any]:
        return self._get('text_encoder_3'), self._get('tokenizer_3')

    def _split_stored(self, embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The CLIP tokens at their own width (768 + 1280), not zero-padded to T5's (4096): half the bytes.
        clip_width = self._get('text_encoder').config.hidden_size + self._get('text_encoder_2').config.hidden_size
        clip_tokens = self._get('tokenizer').model_max_length
        return {
            'clip_embeds': embeddings['text_embeds'][:, :clip_tokens, :clip_width],
            'pooled_text_embeds': embeddings['pooled_text_embeds'],
        }

    def _assemble(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        t5_states, clip_states = batch['t5_embeds'], batch['clip_embeds']
        stored, clip_tokens = clip_states.shape[1], self._get('tokenizer').model_max_length
        if stored != clip_tokens:
            raise ConfigError(
                f'Invalid model.clip_max_length: the batch holds CLIP embeddings of {stored} tokens per caption, '
                f'this model uses {clip_tokens}; set model.clip_max_length={stored} or precompute the shards again '
                'with this model.'
            )
        clip = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        text = torch.cat([clip.to(t5_states.dtype), t5_states], dim=-2)
        return {'text_embeds': text, 'pooled_text_embeds': batch['pooled_text_embeds']}

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return {
            'input_ids': _tokenize(self._get('tokenizer'), captions),
            'input_ids_2': _tokenize(self._get('tokenizer_2'), captions),
            'input_ids_3': _tokenize(self._get('tokenizer_3'), captions),
        }

    def _batch_tokens(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        keys = ('input_ids', 'input_ids_2', 'input_ids_3')
        if all(key in batch for key in keys):
            return {key: batch[key] for key in keys}
        if 'captions' in batch:
            return self.tokenize(batch['captions'])
        raise KeyError(
            f'SD3 batches need "captions" (or {list(keys)}, or "text_embeds"); the batch has {sorted(batch)}.'
        )

    def encode(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``text_embeds`` (B, CLIP's 77 (or ``clip_max_length``) + max_length, d_model of T5) and
        ``pooled_text_embeds`` (B, P_L + P_G)."""
        clip_l, clip_g, t5 = (self._get(n) for n in ('text_encoder', 'text_encoder_2', 'text_encoder_3'))
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            first = clip_l(tokens['input_ids'].to(clip_l.device), output_hidden_states=True)
            second = clip_g(tokens['input_ids_2'].to(clip_g.device), output_hidden_states=True)
            pad_id = self._get('tokenizer_3').pad_token_id
            t5_hidden = _t5_hidden_states(t5, tokens['input_ids_3'], pad_id, self.use_attention_mask)
        clip_hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        clip_hidden = F.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1])).to(t5_hidden.device)
        context = torch.cat([clip_hidden.to(t5_hidden.dtype), t5_hidden], dim=-2)
        pooled = torch.cat([first.text_embeds, second.text_embeds], dim=-1)
        return {'text_embeds': context, 'pooled_text_embeds': pooled}

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        length = self._get('tokenizer').model_max_length + self._get('tokenizer_3').model_max_length
        pooled = self._get('text_encoder').config.projection_dim + self._get('text_encoder_2').config.projection_dim
        return {'text_embeds': (length, self._get('text_encoder_3').config.d_model), 'pooled_text_embeds': (pooled,)}

    def card_usage(self) -> list[str]:
        """Python lines for the model card that sample the exported folder with plain diffusers and get this
        model's images: T5's token count is passed (diffusers defaults to 256), and with a masked T5 the T5 part
        of the embeddings is recomputed with the mask, padding zeroed, since diffusers runs T5 without one."""
        n = self._get('tokenizer_3').model_max_length
        lines = [
            'import torch',
            'from diffusers import StableDiffusion3Pipeline',
            '',
            "pipe = StableDiffusion3Pipeline.from_pretrained('path/to/this/folder')",
            f'n = pipe.tokenizer_3.model_max_length  # {n}: the T5 tokens per caption the model was trained with',
            "prompts, negative = ['a lighthouse on a cliff at sunset'], ['']",
        ]
        if not self.use_attention_mask:
            return lines + [
                'image = pipe(prompts, max_sequence_length=n, num_inference_steps=28, guidance_scale=5.0).images[0]',
                "image.save('lighthouse.png')",
            ]
        return lines + [
            '',
            '',
            'def t5(texts):  # the model was trained with T5 padding masked and zeroed; diffusers does not mask',
            "    tok = pipe.tokenizer_3(texts, padding='max_length', max_length=n, truncation=True,",
            "                           return_tensors='pt')",
            '    hidden = pipe.text_encoder_3(tok.input_ids, attention_mask=tok.attention_mask)[0]',
            '    return hidden * tok.attention_mask[..., None]',
            '',
            '',
            'with torch.no_grad():',
            '    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(',
            '        prompts, prompts, prompts, negative_prompt=negative, max_sequence_length=n',
            '    )',
            '    embeds[:, -n:], negative_embeds[:, -n:] = t5(prompts), t5(negative)',
            'image = pipe(',
            '    prompt_embeds=embeds,',
            '    negative_prompt_embeds=negative_embeds,',
            '    pooled_prompt_embeds=pooled,',
            '    negative_pooled_prompt_embeds=negative_pooled,',
            '    num_inference_steps=28,',
            '    guidance_scale=5.0,',
            ').images[0]',
            "image.save('lighthouse.png')",
        ]

    def _embedding_kwargs(self, positive: dict, negative: dict, num_images_per_prompt: int) -> dict[str, Any]:
        # StableDiffusion3Pipeline does not repeat given embeddings: repeat them here, prompt-major, and ask for one
        # image per (repeated) prompt.
        def repeat(value: torch.Tensor) -> torch.Tensor:
            return value.repeat_interleave(num_images_per_prompt, dim=0)

        return {
            'prompt_embeds': repeat(positive['text_embeds']),
            'pooled_prompt_embeds': repeat(positive['pooled_text_embeds']),
            'negative_prompt_embeds': repeat(negative['text_embeds']),
            'negative_pooled_prompt_embeds': repeat(negative['pooled_text_embeds']),
            'num_images_per_prompt': 1,
        }


def _merged(preset: dict, overrides: Optional[dict]) -> dict:
    return {**preset, **{k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()}}


def _check_preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise ConfigError(f'Invalid model.text_conditioner.preset={preset!r}: expected one of {", ".join(PRESETS)}.')
    return PRESETS[preset]


def _t5_parts(
    config: dict, pretrained: Optional[str], load: Collection[str], max_length: int, encoder: str, tokenizer: str
) -> tuple[Any, Any]:
    """The T5 encoder and tokenizer, each loaded from ``pretrained``'s subfolder ``encoder`` / ``tokenizer`` when
    ``load`` names it, else built from ``config`` (and the offline tokenizer)."""
    built_encoder = (
        build_t5_encoder(pretrained=pretrained, subfolder=encoder)
        if pretrained is not None and encoder in load
        else build_t5_encoder(config)
    )
    built_tokenizer = (
        build_t5_tokenizer(pretrained, max_length, subfolder=tokenizer)
        if pretrained is not None and tokenizer in load
        else build_t5_tokenizer(max_length=max_length)
    )
    return built_encoder, built_tokenizer


def t5(
    text_encoder_config: Optional[dict] = None,
    *,
    preset: str = 'tiny',
    max_length: int = 256,
    use_attention_mask: bool = True,
    pretrained: Optional[str] = None,
    load: Collection[str] = (),
    caption_drop_prob: float = 0.0,
    train_text_encoder: bool = False,
) -> T5TextConditioner:
    """T5 alone: a ``T5EncoderModel`` and its tokenizer, each built (preset + ``text_encoder_config``) or loaded.

    Args:
        text_encoder_config (dict, optional): ``T5Config`` fields over the preset's.
        preset (str): ``'tiny'`` (CPU) or ``'sd3'`` (T5 v1.1 XXL's encoder). Default: ``'tiny'``.
        max_length (int): Tokens per caption. Default: ``256``.
        use_attention_mask (bool): See :class:`T5TextConditioner`. Default: ``True``.
        pretrained (str, optional): A diffusers pipeline folder or hub id with ``text_encoder`` and ``tokenizer``.
        load (Collection[str]): Which of ``text_encoder`` and ``tokenizer`` to load from ``pretrained``.
        caption_drop_prob, train_text_encoder: See :class:`~diffusion.models.conditioners.TextConditioner`.
    """
    config = _merged(_check_preset(preset)['t5'], text_encoder_config)
    encoder, tokenizer = _t5_parts(config, pretrained, load, max_length, 'text_encoder', 'tokenizer')
    return T5TextConditioner(
        encoder,
        tokenizer,
        use_attention_mask=use_attention_mask,
        caption_drop_prob=caption_drop_prob,
        train_text_encoder=train_text_encoder,
    )


def sd3(
    text_encoder_config: Optional[dict] = None,
    text_encoder_2_config: Optional[dict] = None,
    text_encoder_3_config: Optional[dict] = None,
    *,
    preset: str = 'tiny',
    max_length: int = 256,
    clip_max_length: Optional[int] = None,
    use_attention_mask: bool = True,
    pretrained: Optional[str] = None,
    load: Collection[str] = (),
    caption_drop_prob: float = 0.0,
    train_text_encoder: bool = False,
) -> SD3TextConditioner:
    """SD3's conditioner: CLIP-L and CLIP-G with projection, T5, and their tokenizers, each built or loaded.

    Args:
        text_encoder_config, text_encoder_2_config (dict, optional): ``CLIPTextConfig`` fields over the preset's.
        text_encoder_3_config (dict, optional): ``T5Config`` fields over the preset's.
        preset (str): ``'tiny'`` (CPU) or ``'sd3'`` (the published shapes). Default: ``'tiny'``.
        max_length (int): T5 tokens per caption. Default: ``256`` (SD3).
        clip_max_length (int, optional): Tokens per caption of both CLIPs instead of their tokenizers' 77 (fewer
            for short captions: the joint attention then works on fewer text tokens). Saved with the tokenizers;
            diffusers' SD3 pipeline reads it from the first one. Default: ``None`` (77).
        use_attention_mask (bool): See :class:`SD3TextConditioner`. Default: ``True``.
        pretrained (str, optional): A diffusers SD3 pipeline folder or hub id.
        load (Collection[str]): Which of ``text_encoder[_2, _3]`` and ``tokenizer[_2, _3]`` to load.
        caption_drop_prob, train_text_encoder: See :class:`~diffusion.models.conditioners.TextConditioner`.
    """
    configs = _check_preset(preset)
    encoders = []
    for name, key, overrides in (
        ('text_encoder', 'clip_l', text_encoder_config),
        ('text_encoder_2', 'clip_g', text_encoder_2_config),
    ):
        if pretrained is not None and name in load:
            encoders.append(
                build_text_encoder(pretrained=pretrained, subfolder=name, use_safetensors=True, with_projection=True)
            )
        else:
            encoders.append(build_text_encoder(_merged(configs[key], overrides), with_projection=True))
    t5_config = _merged(configs['t5'], text_encoder_3_config)
    t5_encoder, t5_tokenizer = _t5_parts(t5_config, pretrained, load, max_length, 'text_encoder_3', 'tokenizer_3')
    encoders.append(t5_encoder)
    # SD3's CLIP-L tokenizer pads with the end token, the CLIP-G one with '!', as SDXL's.
    tokenizers = [
        build_clip_tokenizer(pretrained, subfolder=name)
        if pretrained is not None and name in load
        else build_clip_tokenizer(pad_token=pad)
        for name, pad in (('tokenizer', EOS_TOKEN), ('tokenizer_2', '!'))
    ]
    for tokenizer, encoder in zip(tokenizers, encoders):
        set_tokens_per_caption(tokenizer, clip_max_length, encoder, 'model.clip_max_length')
    tokenizers.append(t5_tokenizer)
    return SD3TextConditioner(
        *encoders,
        *tokenizers,
        use_attention_mask=use_attention_mask,
        caption_drop_prob=caption_drop_prob,
        train_text_encoder=train_text_encoder,
    )
