"""Optimizer-side training options: the text encoder's own learning rate, 8-bit AdamW and TF32 matmuls.

- ``optimizer.text_encoder_lr``: the trainable weights inside the text encoders (full fine-tuning with
  ``model.train_text_encoder: true``, or their LoRA layers) form a second ``torch.optim`` parameter group with this
  learning rate; everything else keeps ``optimizer.lr``. Composer's schedulers scale each group from its own
  initial LR, so a warm-up or decay applies to both in proportion.
- ``optimizer.name: adamw_8bit``: bitsandbytes' ``AdamW8bit`` (block-wise 8-bit optimizer states, about a quarter
  of AdamW's state memory). It runs on CUDA only; anywhere else the build fails in one line saying why (no CUDA
  device, or bitsandbytes not installed: ``pip install -e .[bnb]``), never falling back to another optimizer.
- ``tf32: true`` (top level): ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``,
  i.e. float32 matmuls and convolutions on Ampere-or-newer GPUs in TF32 (10-bit mantissa inputs, fp32
  accumulation). On a CPU run it changes nothing and says so in the log.

Built on ``torch.optim`` parameter groups, bitsandbytes' ``bnb.optim.AdamW8bit`` and torch's backend flags; nothing
here re-implements an optimizer.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch
from torch import nn

__all__ = ['adamw_8bit', 'apply_tf32', 'parameter_groups']

log = logging.getLogger(__name__)


def _text_encoder_parameters(model: nn.Module) -> set[int]:
    conditioner = getattr(model, 'conditioner', None)
    encoders = conditioner.encoders() if conditioner is not None else []
    return {id(p) for encoder in encoders for p in encoder.parameters()}


def parameter_groups(model: nn.Module, text_encoder_lr: Optional[float] = None) -> list[Any]:
    """The trainable parameters of ``model``: one list, or, with ``text_encoder_lr``, two groups: everything but
    the text encoders (the optimizer's own ``lr``), then the text encoders' trainable weights at ``text_encoder_lr``.

    Raises:
        ValueError: ``text_encoder_lr`` is given but no text-encoder weight trains, or is not a positive number.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError('The model has no trainable parameters.')
    if text_encoder_lr is None:
        return params
    if isinstance(text_encoder_lr, bool) or not isinstance(text_encoder_lr, (int, float)) or text_encoder_lr <= 0:
        raise ValueError(f'Invalid optimizer.text_encoder_lr={text_encoder_lr!r}: expected a positive number.')
    encoder_ids = _text_encoder_parameters(model)
    encoder = [p for p in params if id(p) in encoder_ids]
    rest = [p for p in params if id(p) not in encoder_ids]
    if not encoder:
        raise ValueError(
            f'optimizer.text_encoder_lr={text_encoder_lr} but no text-encoder weight trains; set '
            'model.train_text_encoder: true (full fine-tuning) or model.adapters.lora.text_encoder: true.'
        )
    groups: list[dict[str, Any]] = [{'params': rest}] if rest else []
    return groups + [{'params': encoder, 'lr': float(text_encoder_lr)}]


def adamw_8bit(
    params: Iterable[Any],
    lr: float = 1.0e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1.0e-8,
    weight_decay: float = 1.0e-2,
    min_8bit_size: int = 4096,
) -> torch.optim.Optimizer:
    """bitsandbytes' ``AdamW8bit``, registered as the ``adamw_8bit`` optimizer; CUDA only.

    Args:
        params: Parameters or parameter groups (given by the builder).
        lr, betas, eps, weight_decay: As for ``torch.optim.AdamW``.
        min_8bit_size (int): Tensors with fewer elements keep 32-bit states (bitsandbytes' default). Default:
            ``4096``.

    Raises:
        RuntimeError: No CUDA device, or bitsandbytes is not installed; one line, before anything is built.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "optimizer.name=adamw_8bit needs a CUDA GPU (bitsandbytes' 8-bit states live on it) and none is "
            'available here; use optimizer.name=adamw or decoupled_adamw.'
        )
    try:
        import bitsandbytes
    except ImportError as error:
        raise RuntimeError(
            f'optimizer.name=adamw_8bit needs bitsandbytes, which cannot be imported ({error}); install it with '
            "pip install -e '.[bnb]', or use optimizer.name=adamw."
        ) from None
    return bitsandbytes.optim.AdamW8bit(
        params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
    )


def apply_tf32(enabled: bool, device: str) -> bool:
    """Switch TF32 matmuls and cuDNN convolutions on for a GPU run (``tf32: true``); return whether it did.

    On a CPU run the flags are left as they are (they only concern CUDA kernels) and the log says so. ``False``
    leaves torch's defaults untouched, so a yaml without the key behaves as before.
    """
    if not enabled:
        return False
    if device != 'gpu':
        log.info('tf32: true has no effect on this %s run (TF32 is a CUDA matmul mode); nothing changed.', device)
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log.info('tf32: float32 matmuls and cuDNN convolutions run in TF32 (float32_matmul_precision=%s).',
             torch.get_float32_matmul_precision())  # fmt: skip
    return True
