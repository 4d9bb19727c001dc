"""LoRA: low-rank adapters on the denoiser's (and optionally the text encoders') attention projections.

``model.adapters: {lora: {rank: 8, alpha: 8, dropout: 0.0, target_modules: null, text_encoder: false}}`` freezes the
whole model, then adds to each targeted ``nn.Linear`` ``W`` a trainable ``(alpha / rank) * B @ A`` with
``A: rank x in`` (random) and ``B: out x rank`` (zeros, so training starts from the base model exactly), i.e.
``rank * (in + out)`` parameters per targeted layer. Only those train; the optimizer, EMA and gradient clipping
see nothing else.

Builds on library pieces, nothing re-implemented:

- peft's ``LoraConfig`` and its LoRA layers (``peft.tuners.lora``), injected into the denoiser by diffusers'
  ``PeftAdapterMixin.add_adapter`` (UNet, SD3 transformer) and into CLIP text encoders by transformers'
  ``PeftAdapterMixin.add_adapter``; both call ``peft.inject_adapter_in_model``;
- merging uses peft's ``BaseTunerLayer.merge`` on every LoRA layer and diffusers' ``recurse_remove_peft_layers``
  to put the (now fused) base layers back, so an export is a plain diffusers pipeline;
- the exports of the adapter alone (:mod:`diffusion.inference.export`) use ``peft.get_peft_model_state_dict`` and
  diffusers' ``save_lora_weights`` / ``convert_state_dict_to_diffusers``.

The adapted weights stay ordinary parameters of the model under peft's names
(``unet....attn1.to_q.base_layer.weight``, ``unet....attn1.to_q.lora_A.default.weight``), so a checkpoint of a LoRA
run loads strictly into the model the same config builds. :func:`base_state_dict` and :func:`base_digest` name and
hash the frozen base under the names it has without the adapter.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from diffusion.models.adapters import Adapter

__all__ = [
    'ADAPTER_NAME',
    'DENOISER_TARGETS',
    'TEXT_ENCODER_TARGETS',
    'LoRA',
    'base_digest',
    'base_state_dict',
    'is_lora_name',
    'lora_layers',
]

#: peft's adapter name for the one adapter this project trains.
ADAPTER_NAME = 'default'
#: Default targets by denoiser: the attention projections (SD3's joint attention also projects the text stream).
DENOISER_TARGETS = {
    'unet': ['to_q', 'to_k', 'to_v', 'to_out.0'],
    'mmdit': ['to_q', 'to_k', 'to_v', 'to_out.0', 'add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out'],
}
#: Default targets in CLIP text encoders.
TEXT_ENCODER_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'out_proj']


def is_lora_name(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA layer (``lora_A`` / ``lora_B`` / their embeddings)."""
    return '.lora_' in name or name.startswith('lora_')


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The peft tuner layers (LoRA-wrapped ``nn.Linear``) inside ``module``, by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def base_state_dict(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """``model``'s state without its LoRA weights (and without the names in ``exclude``, e.g. another adapter's
    trainable weights), under the names the unadapted model gives them (``...to_q.base_layer.weight`` ->
    ``...to_q.weight``)."""
    exclude = set(exclude)
    return {
        name.replace('.base_layer.', '.'): value
        for name, value in model.state_dict().items()
        if not is_lora_name(name) and name not in exclude
    }


def base_digest(model: nn.Module, exclude: Iterable[str] = ()) -> str:
    """SHA-256 of the frozen base weights of ``model`` (:func:`base_state_dict`): every tensor's name, dtype, shape
    and bytes in name order, so the same base gives the same digest whatever adapter sits on it.

    Args:
        model (nn.Module): The model, adapted or not.
        exclude (Iterable[str]): State-dict names to leave out (the trainable weights of a non-LoRA adapter).
    """
    state = base_state_dict(model, exclude)
    keys = sorted(state)
    digest = hashlib.sha256()
    for key in keys:
        tensor = state[key].detach().to('cpu').contiguous()
        digest.update(f'{key}|{tensor.dtype}|{tuple(tensor.shape)}\n'.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b'')
    return digest.hexdigest()


def _adaptable(module: nn.Module) -> list[str]:
    """Names of the layers of ``module`` that peft's LoRA adapts (``nn.Linear``, ``nn.Conv2d``)."""
    return [name for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and name]


def _check_targets(targets: Sequence[str], modules: dict[str, nn.Module], where: str, each: bool = True) -> None:
    """Refuse, before anything changes, a target that names no adaptable layer (in each module, or in any of them
    when ``each`` is false), naming the key and the accepted names (the layers' last name parts)."""
    layers = {owner: _adaptable(module) for owner, module in modules.items()}
    for target in targets:
        found = {owner: any(n == target or n.endswith('.' + target) for n in names) for owner, names in layers.items()}
        if (all if each else any)(found.values()):
            continue
        owners = [owner for owner, hit in found.items() if not hit] if each else list(layers)
        accepted = sorted({_short(n) for owner in owners for n in layers[owner]})
        raise ValueError(
            f'{where}: {target!r} names no Linear or Conv2d layer of {", ".join(owners)}; accepted: '
            f'{", ".join(accepted)} (or a longer dotted path ending in one).'
        )


def _short(name: str) -> str:
    """A layer's last name part, with its parent for a numbered one (``to_out.0``, not ``0``)."""
    parts = name.split('.')
    return '.'.join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


class LoRA(Adapter):
    """Low-rank adapters (see the module docstring); registered as the ``lora`` adapter.

    Args:
        rank (int): Rank ``r`` of each adapter. Default: ``4``.
        alpha (float, optional): Scale numerator: the update is ``alpha / rank * B @ A``. Default: ``rank``.
        dropout (float): Dropout on the adapter's input while training. Default: ``0.0``.
        target_modules (Sequence[str], optional): Names (suffixes) of the denoiser's ``nn.Linear`` layers to adapt.
            Default: the attention projections of the denoiser's family (:data:`DENOISER_TARGETS`).
        text_encoder (bool): Also adapt the CLIP text encoders (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``;
            a T5 encoder has none of them and is left frozen as it is). Default: ``False``.
        text_encoder_target_modules (Sequence[str], optional): Targets in the text encoders. Default:
            :data:`TEXT_ENCODER_TARGETS`.
    """

    name = 'lora'

    def __init__(
        self,
        rank: int = 4,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        target_modules: Optional[Sequence[str]] = None,
        text_encoder: bool = False,
        text_encoder_target_modules: Optional[Sequence[str]] = None,
    ):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f'model.adapters.lora.rank must be a positive integer; got {rank!r}.')
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f'model.adapters.lora.dropout must be in [0, 1); got {dropout}.')
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else rank)
        self.dropout = float(dropout)
        self.target_modules = list(target_modules) if target_modules else None
        self.text_encoder = bool(text_encoder)
        self.text_encoder_target_modules = list(text_encoder_target_modules or TEXT_ENCODER_TARGETS)
        self.adapted: list[str] = []  # the model attributes that carry LoRA layers, once applied

    def _config(self, targets: Sequence[str]) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(targets),
            init_lora_weights=True,  # A random (Kaiming), B zero: the adapted model starts as the base
        )

    def denoiser_targets(self, model: Any) -> list[str]:
        if self.target_modules:
            return self.target_modules
        attribute = model.denoiser.attribute
        return DENOISER_TARGETS['mmdit' if attribute == 'transformer' else 'unet']

    def apply(self, model: Any) -> None:
        """Freeze every weight of ``model`` and add trainable LoRA layers to the denoiser (and text encoders)."""
        attribute = model.denoiser.attribute
        network = getattr(model, attribute)
        _check_targets(self.denoiser_targets(model), {attribute: network}, 'model.adapters.lora.target_modules')
        if self.text_encoder:
            encoders = {n: e for n, e in model.conditioner.components().items() if isinstance(e, nn.Module)}
            where = 'model.adapters.lora.text_encoder_target_modules'
            _check_targets(self.text_encoder_target_modules, encoders, where, each=False)
        model.requires_grad_(False)
        network.add_adapter(self._config(self.denoiser_targets(model)), adapter_name=ADAPTER_NAME)
        self.adapted = [attribute]
        if self.text_encoder:
            for name, encoder in model.conditioner.components().items():
                if not isinstance(encoder, nn.Module):
                    continue
                names = {n.rsplit('.', 1)[-1] for n, m in encoder.named_modules() if isinstance(m, nn.Linear)}
                if not names & set(self.text_encoder_target_modules):
                    continue  # T5 (q, k, v, o) stays frozen
                encoder.add_adapter(self._config(self.text_encoder_target_modules), adapter_name=ADAPTER_NAME)
                self.adapted.append(name)
            if len(self.adapted) == 1:
                raise ValueError(
                    f'model.adapters.lora.text_encoder: no text encoder has {self.text_encoder_target_modules}.'
                )
            # Gradients flow through the encoders (their LoRA layers train) and they run in train mode.
            model.conditioner.train_text_encoder = True
        for parameter_name, parameter in model.named_parameters():
            parameter.requires_grad_(is_lora_name(parameter_name))
        model.train(model.training)

    def trainable_names(self, model: nn.Module) -> list[str]:
        return [name for name, p in model.named_parameters() if p.requires_grad]

    def merge(self, model: Any) -> None:
        """Fuse every LoRA update into its base weight and put the plain layers back (peft's ``merge``, diffusers'
        ``recurse_remove_peft_layers``)."""
        from diffusers.utils import recurse_remove_peft_layers

        for attribute in self.adapted:
            module = getattr(model, attribute)
            for _, layer in lora_layers(module):
                layer.merge(adapter_names=[ADAPTER_NAME])
            recurse_remove_peft_layers(module)
            for flag in ('peft_config',):
                if hasattr(module, flag):
                    delattr(module, flag)
            if hasattr(module, '_hf_peft_config_loaded'):
                module._hf_peft_config_loaded = False
        self.adapted = []

    def describe(self) -> dict[str, Any]:
        return {
            'adapter': 'lora',
            'rank': self.rank,
            'alpha': self.alpha,
            'dropout': self.dropout,
            'target_modules': self.target_modules or 'default',
            'adapted': list(self.adapted),
        }
