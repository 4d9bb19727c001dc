"""Registries of the model's components: denoisers, text conditioners, objectives and adapters.

A config names a component by its registry name and gives its builder's arguments, e.g.
``model: {name: latent_diffusion, denoiser: {name: unet, config: {...}}, objective: {name: ddpm}}``; the family
factories (``stable_diffusion_2``, ``tiny_stable_diffusion_xl``, ...) fill the same sections from their presets.
Built on :class:`diffusion.utils.Registry` (``catalogue``), so a package outside this repository adds a component
through the entry-point groups ``diffusion_denoisers``, ``diffusion_text_conditioners``, ``diffusion_objectives``
and ``diffusion_adapters`` without editing this file. :mod:`diffusion.registry` lists these beside the others.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from diffusion.models import conditioners as conditioner_classes
from diffusion.models import denoisers as denoiser_classes
from diffusion.models import lora, mmdit, rectified_flow, t5_conditioners
from diffusion.models import objectives as objective_classes
from diffusion.utils import Registry, accepted_keys

__all__ = ['adapters', 'build_component', 'denoisers', 'objectives', 'text_conditioners']

denoisers = Registry('denoisers', 'Denoising networks bound to what the trainer asks of them (Denoiser).')
text_conditioners = Registry('text_conditioners', 'Text encoders + tokenizers -> conditioning (TextConditioner).')
objectives = Registry('objectives', 'Training objectives: noising, target, timesteps, weights, inference scheduler.')
adapters = Registry('adapters', 'Changes applied to the built model before the optimizer (Adapter).')

adapters.register_all({'lora': lora.LoRA})
denoisers.register_all({'unet': denoiser_classes.unet, 'mmdit': mmdit.mmdit})
text_conditioners.register_all(
    {
        'clip': conditioner_classes.clip,
        'sdxl_clip': conditioner_classes.sdxl_clip,
        't5': t5_conditioners.t5,
        'sd3': t5_conditioners.sd3,
    }
)
objectives.register_all(
    {'ddpm': objective_classes.DDPMObjective, 'rectified_flow': rectified_flow.RectifiedFlowObjective}
)


def build_component(
    registry: Registry,
    section: Union[str, Mapping[str, Any], None],
    *,
    where: str,
    default: Optional[str] = None,
    **provided,
) -> Any:
    """Build a ``{name: ..., <kwargs>}`` section from ``registry``; ``provided`` arguments come from the code.

    Args:
        registry (Registry): Where the name is looked up.
        section (str | Mapping, optional): The config section, or a name alone for that component's defaults;
            ``None`` builds ``default`` with no arguments.
        where (str): Config path for messages, e.g. ``'model.objective'``.
        default (str, optional): Name used when the section gives none.
        **provided: Arguments the caller fills (e.g. ``pretrained``) when the builder takes them; a config may
            not set them.
    """
    kwargs = {'name': section} if isinstance(section, str) else dict(section or {})
    name = kwargs.pop('name', default)
    if name is None:
        raise ValueError(f'{where} needs a name. Valid names: {", ".join(registry.names())}.')
    names, accepts_any = accepted_keys(registry.get(name))
    provided = {key: value for key, value in provided.items() if accepts_any or key in names}
    return registry.build(name, kwargs, where=where, **provided)
