"""Load a LoRA file (diffusers' ``pytorch_lora_weights.safetensors`` or the kohya / ComfyUI layout) onto a model,
all of it or nothing.

diffusers' ``load_lora_weights`` injects the layers a file names into the pipeline's networks, but a key that
matches no layer is only logged as a warning, a kohya file whose keys carry an unknown prefix loads nothing with a
warning, and a file for another architecture fails with a page of ``size mismatch`` lines. :func:`load_lora` turns
each into one line naming the file and the key, after removing whatever was injected, so a model never samples with
part of an adapter:

- a file whose metadata records the SHA-256 of its base (``base_sha256``, which :func:`~diffusion.inference.export.
  export_lora` writes in both files) is refused on a model whose base weights hash otherwise
  (:func:`diffusion.models.lora.base_digest`);
- a kohya-layout key outside ``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_`` (SD1/SD2/SDXL) is refused;
- a weight of another shape than the layer it names (a file for another base model) is refused;
- every LoRA weight of the file must end up in the model: fewer loaded than the file holds is refused, naming the
  keys diffusers reported as matching no layer.

Built on diffusers' ``load_lora_weights`` / ``unload_lora_weights`` of the family's pipeline (which shares the
model's modules, so the adapter lands on the model itself), peft's ``get_peft_model_state_dict`` to count what
loaded, and safetensors for the keys and metadata.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Optional

from torch import nn

__all__ = ['KOHYA_KEY_PREFIXES', 'LoraFileError', 'load_lora']

#: The kohya layout's key prefixes this loader accepts: SD1/SD2 (``lora_unet_``, ``lora_te_``) and SDXL
#: (``lora_te1_``, ``lora_te2_``).
KOHYA_KEY_PREFIXES = ('lora_unet_', 'lora_te_', 'lora_te1_', 'lora_te2_')
# The tensors that carry a LoRA update, in each layout diffusers reads (peft's lora_A / lora_B, diffusers'
# lora.down / lora.up and, for CLIP, lora_linear_layer.down / .up, kohya's lora_down / lora_up); alpha and the like
# are scalars beside them.
_WEIGHT_KEY = re.compile(
    r'\.(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer\.(down|up))\.weight$'
)
_SIZE_MISMATCH = re.compile(r'size mismatch for (\S+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) from '
                            r'checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))')  # fmt: skip
_UNEXPECTED = re.compile(r'unexpected keys found in the model: (.*?)\.?\s*$', re.S)
ADAPTER_NAME = 'loaded'


class LoraFileError(ValueError):
    """A LoRA file that does not fit the model; the message names the file and the key."""


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _split(path: str, weight_name: Optional[str]) -> tuple[str, str]:
    from diffusion.inference.export import LORA_WEIGHTS

    if os.path.isdir(path):
        return path, weight_name or LORA_WEIGHTS
    return os.path.dirname(path) or '.', os.path.basename(path)


def _loaded_weights(pipeline: Any) -> int:
    from peft import get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for component in pipeline.components.values():
        if isinstance(component, nn.Module) and any(isinstance(m, BaseTunerLayer) for m in component.modules()):
            if ADAPTER_NAME in getattr(component, 'peft_config', {}):
                count += len(get_peft_model_state_dict(component, adapter_name=ADAPTER_NAME))
    return count


def load_lora(model: Any, path: str, weight_name: Optional[str] = None, check_base: bool = True) -> dict[str, Any]:
    """Load the LoRA file at ``path`` (a file, or a folder with ``weight_name``, default diffusers'
    ``pytorch_lora_weights.safetensors``) onto ``model``'s networks, entirely or not at all.

    Args:
        model: A :class:`~diffusion.models.StableDiffusion` (its ``pipeline()`` shares its modules).
        path (str): The ``.safetensors`` file, or the folder that holds it.
        weight_name (str, optional): The file name in a folder ``path``.
        check_base (bool): Refuse a file whose ``base_sha256`` metadata is not this model's base. Default: ``True``.

    Raises:
        LoraFileError: The file is for another base, has keys that match no layer, or weights of other shapes;
            one line naming the file and the key. Nothing stays loaded.

    Returns:
        dict: ``file`` (the path read) and ``weights`` (LoRA tensors loaded).
    """
    from safetensors import safe_open

    folder, name = _split(path, weight_name)
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        raise LoraFileError(f'{file}: no such LoRA file.')
    with safe_open(file, 'pt') as f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
    weights = [k for k in keys if _WEIGHT_KEY.search(k)]
    if not weights:
        raise LoraFileError(f'{file}: holds no LoRA weights (no key ends in lora_A/lora_B/lora_down/lora_up.weight).')
    if check_base and metadata.get('base_sha256'):
        from diffusion.models.lora import base_digest

        ours = base_digest(model)  # every weight but LoRA layers', under their unadapted names
        if ours != metadata['base_sha256']:
            raise LoraFileError(
                f'{file}: made for the base {metadata.get("base_model", "?")} (metadata base_sha256 '
                f"{metadata['base_sha256']}), but this model's base is sha256 {ours}; load it on its own base."
            )
    kohya = [k for k in keys if '.lora_down.' in k or '.lora_up.' in k]
    unknown = [k for k in kohya if not k.startswith(KOHYA_KEY_PREFIXES)]
    if unknown:
        raise LoraFileError(
            f'{file}: kohya key {unknown[0]!r} ({len(unknown)} such) has an unknown prefix; accepted: '
            f'{", ".join(KOHYA_KEY_PREFIXES)} (SD1/SD2/SDXL).'
        )

    pipeline = model.pipeline()
    catcher = _Warnings()
    diffusers_logger = logging.getLogger('diffusers')
    level = diffusers_logger.level
    diffusers_logger.addHandler(catcher)
    diffusers_logger.setLevel(min(level or logging.WARNING, logging.WARNING))
    try:
        try:
            pipeline.load_lora_weights(folder, weight_name=name, adapter_name=ADAPTER_NAME)
        except (RuntimeError, ValueError) as error:
            _unload(pipeline)
            mismatch = _SIZE_MISMATCH.search(str(error))
            if mismatch:
                key, theirs, ours = mismatch.groups()
                owner = re.search(r'loading state_dict for (\w+)', str(error))
                key = key.replace(f'.{ADAPTER_NAME}', '') + (f' (of the {owner.group(1)})' if owner else '')
                raise LoraFileError(
                    f'{file}: {key} is {theirs[11:-1]} in the file but '
                    f'{ours[11:-1]} in this model: the file is for another base model.'
                ) from None
            raise LoraFileError(f'{file}: {str(error).splitlines()[0]}') from None
    finally:
        diffusers_logger.removeHandler(catcher)
        diffusers_logger.setLevel(level)
    loaded = _loaded_weights(pipeline)
    if loaded < len(weights):
        _unload(pipeline)
        reported = next((m for m in (_UNEXPECTED.search(w) for w in catcher.messages) if m), None)
        names = reported.group(1).replace(f'.{ADAPTER_NAME}', '') if reported else ''
        names = _file_keys(names, weights) or names
        shown = f' (matching no layer: {names[:300]})' if names else ''
        raise LoraFileError(
            f'{file}: {len(weights) - loaded} of its {len(weights)} LoRA weights name no layer of this '
            f'{type(pipeline).__name__}{shown}; nothing was loaded.'
        )
    return {'file': file, 'weights': loaded}


def _file_keys(reported: str, weights: list[str]) -> str:
    """The file's own keys behind diffusers' names of unloaded weights (``no.such.to_q.lora_A.weight`` ->
    ``lora_unet_no_such_to_q.lora_down.weight``), matched with dots and underscores alike; '' when none match."""
    modules = {name.split('.lora_')[0].replace('.', '_') for name in reported.split(', ') if '.lora_' in name}

    def stem(key: str) -> str:
        module = key.split('.lora_')[0].split('.lora.')[0]
        for prefix in sorted(KOHYA_KEY_PREFIXES, key=len, reverse=True):
            if module.startswith(prefix):
                return module[len(prefix) :]
        return module.split('.', 1)[-1]  # diffusers' names start with the component: unet., text_encoder.

    return ', '.join(k for k in weights if stem(k).replace('.', '_') in modules)


def _unload(pipeline: Any) -> None:
    try:
        pipeline.unload_lora_weights()
    except Exception:  # nothing was injected
        pass
