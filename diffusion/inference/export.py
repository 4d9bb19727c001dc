"""Export a trained model: ``python -m diffusion.inference.export --checkpoint ... --out dir/``.

Writes a diffusers pipeline folder (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or
``StableDiffusion3Pipeline``, whatever the model's ``pipeline()`` returns; a rectified-flow model's scheduler is
``FlowMatchEulerDiscreteScheduler`` with its shift, which the loader turns back into the objective) with diffusers'
``save_pretrained(safe_serialization=True)``, so every weight file is safetensors and nothing is pickled; the EMA
weights when the checkpoint has them (see :mod:`diffusion.inference.loading`). On request it also writes the
single-file checkpoint in the original layout that ComfyUI and similar tools load
(:mod:`diffusion.models.single_file`), and always the model card (:mod:`diffusion.inference.model_card`; for SD3 its
example shows how plain diffusers gets this model's T5 conditioning) with the training data's license mix, its
provenance report and attribution manifest copied beside it. A ``--provenance`` report whose dataset fingerprint
differs from the one the checkpoint recorded for its training data is refused before anything is written, unless
``--force-provenance``.

A checkpoint of a LoRA run (``model.adapters: {lora: ...}``) exports three ways: by default, or with ``--fused``
(which refuses a checkpoint without adapters), the adapter merged into a plain pipeline; with ``--lora``, the adapter
alone (:func:`export_lora`: diffusers' ``pytorch_lora_weights.safetensors`` and the model card), plus with
``--kohya NAME`` the kohya / ComfyUI file (SD1/SD2/SDXL models).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
from typing import Any, Optional

import torch
from torch import nn

from diffusion.inference.loading import CONDITIONING_FILE, load_checkpoint
from diffusion.inference.model_card import (
    ProvenanceMismatchError,
    check_attribution_url,
    check_provenance,
    write_model_card,
)
from diffusion.models.adapters import merge_adapters
from diffusion.models.single_file import save_single_file
from diffusion.utils import ConfigError, check_writable_folder

__all__ = ['DTYPES', 'KOHYA_PREFIXES', 'LORA_WEIGHTS', 'PICKLE_SUFFIXES', 'export_lora', 'export_model', 'main']

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl', '.pickle')


def _cast(pipeline: Any, dtype: torch.dtype) -> Any:
    """A pipeline of the same class whose networks are ``dtype`` copies; the model's own modules stay untouched."""
    components = dict(pipeline.components)
    for name, component in components.items():
        if isinstance(component, nn.Module) and any(p.dtype != dtype for p in component.parameters()):
            components[name] = copy.deepcopy(component).to(dtype)
    accepted = inspect.signature(type(pipeline)).parameters
    # Flags of the constructor that the pipeline keeps in its config (requires_safety_checker, SDXL's
    # force_zeros_for_empty_prompt), so that the copy is configured as the original.
    flags = {k: pipeline.config[k] for k in accepted if k not in components and k in pipeline.config}
    return type(pipeline)(**components, **flags)


def _single_file_path(single_file: str, out_dir: str) -> str:
    # A bare file name goes into the export folder, beside the pipeline it was made from.
    return single_file if os.path.dirname(single_file) else os.path.join(out_dir, single_file)


def export_model(
    model: Any,
    out_dir: str,
    *,
    dtype: str = 'fp32',
    single_file: Optional[str] = None,
    model_card: bool = True,
    **card_kwargs: Any,
) -> dict[str, str]:
    """Write ``model`` as a diffusers pipeline folder, optionally a single-file checkpoint, and its model card.

    Args:
        model: A model with ``pipeline()`` (e.g. :class:`~diffusion.models.StableDiffusion`); not modified.
        out_dir (str): The pipeline folder (created; files of an earlier export are overwritten).
        dtype (str): Weight type of the export: ``'fp32'``, ``'fp16'`` or ``'bf16'``. Default: ``'fp32'``.
        single_file (str, optional): Also write the single-file safetensors checkpoint here; a bare file name
            is put in ``out_dir``.
        model_card (bool): Write ``README.md``. Default: ``True``.
        **card_kwargs: Passed to :func:`~diffusion.inference.model_card.write_model_card` (``config``,
            ``provenance``, ``data_fingerprint``, ``force_provenance``, ``attribution_url``, ``weights``, ``batch``,
            ``name``).

    Raises:
        ProvenanceMismatchError: ``provenance`` does not describe the training data (``data_fingerprint``) and
            ``force_provenance`` is off; raised before anything is written.

    Returns:
        dict[str, str]: Paths written: ``pipeline`` (the folder), and ``single_file`` and ``model_card`` when written.
    """
    if dtype not in DTYPES:
        raise ValueError(f'Unknown dtype {dtype!r}. Valid values: {", ".join(DTYPES)}.')
    if not hasattr(model, 'pipeline'):
        raise TypeError(f'{type(model).__name__} has no pipeline(); only diffusion models can be exported.')
    if model_card:  # a false license mix or a link that will break is refused before the folder is written
        force = card_kwargs.get('force_provenance', False)
        check_provenance(card_kwargs.get('provenance'), card_kwargs.get('data_fingerprint'), force)
        check_attribution_url(card_kwargs.get('attribution_url'))
    if getattr(model, 'adapters', None):
        # A plain diffusers pipeline has no adapters: merge them into a copy's base weights (the model is unchanged).
        model = merge_adapters(copy.deepcopy(model))
    pipeline = _cast(model.pipeline(), DTYPES[dtype])
    if single_file and pipeline.components.get('unet') is None:  # before anything is written
        raise ValueError(
            f'--single-file: the single-file layout holds a UNet model (SD2, SDXL); a {type(pipeline).__name__} '
            'has none. Export the diffusers folder alone.'
        )
    os.makedirs(out_dir, exist_ok=True)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    pickles = [
        os.path.join(root, name)
        for root, _, names in os.walk(out_dir)
        for name in names
        if name.endswith(PICKLE_SUFFIXES)
    ]
    if pickles:
        raise RuntimeError(f'The export folder holds pickled weights, which it must not: {pickles}')
    export_kwargs = getattr(model.conditioner, 'export_kwargs', None)
    if export_kwargs is not None:  # what the pipeline's configs cannot hold (T5's mask), for the loader
        with open(os.path.join(out_dir, CONDITIONING_FILE), 'w') as f:
            json.dump(export_kwargs(), f, indent=2, sort_keys=True)
    written = {'pipeline': out_dir}
    if single_file:
        path = _single_file_path(single_file, out_dir)
        metadata = {'pipeline': type(pipeline).__name__, 'dtype': dtype}
        written['single_file'] = save_single_file(pipeline, path, metadata=metadata)
    if model_card:
        single_name = os.path.basename(written['single_file']) if single_file else None
        written['model_card'] = write_model_card(model, out_dir, single_file=single_name, dtype=dtype, **card_kwargs)
    return written


#: The file diffusers' ``save_lora_weights`` writes and ``load_lora_weights(folder)`` reads.
LORA_WEIGHTS = 'pytorch_lora_weights.safetensors'
#: kohya / ComfyUI key prefixes by pipeline attribute; SDXL numbers its two text encoders (lora_te1, lora_te2).
KOHYA_PREFIXES = {'unet': 'lora_unet', 'text_encoder': 'lora_te', 'text_encoder_2': 'lora_te2'}


def _lora_adapter(model: Any) -> Any:
    from diffusion.models.lora import LoRA

    adapters = [a for a in getattr(model, 'adapters', None) or [] if isinstance(a, LoRA)]
    if len(adapters) != 1 or len(model.adapters) != 1:
        names = [getattr(a, 'name', type(a).__name__) for a in getattr(model, 'adapters', None) or []]
        raise ValueError(f'An adapter export needs a model with one lora adapter; it has {names or "none"}.')
    return adapters[0]


def _peft_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``module`` under peft's adapter-free names (``...to_q.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    from diffusion.models.lora import ADAPTER_NAME

    state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    return {k: v.detach().to('cpu', torch.float32).contiguous() for k, v in state.items()}


def _kohya_weights(module_weights: dict[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """One component's LoRA weights in the kohya / ComfyUI layout: ``<prefix>_<module path with _>.lora_down.weight``
    (peft's A), ``.lora_up.weight`` (B) and ``.alpha`` (the update is ``alpha / rank * up @ down``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in module_weights.items():
        module, _, kind = key.rpartition('.lora_')
        stem = f'{prefix}_{module.replace(".", "_")}'
        out[f'{stem}.lora_down.weight' if kind.startswith('A') else f'{stem}.lora_up.weight'] = value
        out[f'{stem}.alpha'] = torch.tensor(float(alpha))
    return out


def _diffusers_layout(weights: dict[str, torch.Tensor], convert: Any) -> dict[str, torch.Tensor]:
    """``weights`` (peft's names) in the layout diffusers' ``save_lora_weights`` writes: converted by
    ``convert_state_dict_to_diffusers`` when it renames every key, else peft's names as they are. The converter renames
    only the attention projections it knows (``to_q``, ``q_proj``, ...), and a denoiser's loader converts a file back
    only when its first key is not peft's: a mixed file (SD3's ``add_q_proj`` beside ``to_q``, or a UNet LoRA with
    other targets) would load with the renamed layers silently left out. peft's names load whole."""
    converted = convert(dict(weights))
    mixed = any('.lora_A.' in key or '.lora_B.' in key for key in converted) and set(converted) != set(weights)
    return dict(weights) if mixed else converted


def export_lora(
    model: Any, out_dir: str, *, kohya_file: Optional[str] = 'lora_kohya.safetensors', model_card: bool = True,
    **card_kwargs: Any,
) -> dict[str, str]:  # fmt: skip
    """Write the LoRA adapter of ``model`` alone: diffusers' ``pytorch_lora_weights.safetensors`` (what
    ``pipeline.load_lora_weights(out_dir)`` reads, the LoRA config in its metadata so that alpha survives), a kohya /
    ComfyUI single file, and a model card naming the base model (path and SHA-256 of its weights) and the training
    data's license mix. The fused pipeline is :func:`export_model` of the same model.

    Built on peft's ``get_peft_model_state_dict``, diffusers' ``convert_state_dict_to_diffusers`` and the pipeline
    class's ``save_lora_weights``; the kohya layout is written here (diffusers reads it back with its converter).

    Args:
        model: A model with one ``lora`` adapter applied; not modified.
        out_dir (str): Folder for the files (created).
        kohya_file (str, optional): File name (in ``out_dir``) of the kohya-layout file (SD1/SD2/SDXL UNet models
            only; an SD3 model is refused, naming it); ``None`` skips it.
        model_card (bool): Write ``README.md``. Default: ``True``.
        **card_kwargs: As for :func:`export_model` (``config``, ``provenance``, ``data_fingerprint``, ...).

    Returns:
        dict[str, str]: Paths written: ``lora``, and ``kohya`` and ``model_card`` when written.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from diffusion.models.lora import ADAPTER_NAME, base_digest

    adapter = _lora_adapter(model)
    unsupported = [a for a in adapter.adapted if a not in KOHYA_PREFIXES]
    if kohya_file and unsupported:  # before anything is written
        raise ValueError(
            f'kohya_file={kohya_file!r}: the kohya / ComfyUI LoRA layout is for SD1/SD2/SDXL UNet models; this '
            f'{type(model.pipeline()).__name__} adapts {", ".join(unsupported)}, which it has no keys for. Export '
            f'the diffusers file alone (kohya_file=None, or no --kohya), which load_lora_weights reads.'
        )
    if model_card:
        check_provenance(card_kwargs.get('provenance'), card_kwargs.get('data_fingerprint'),
                         card_kwargs.get('force_provenance', False))  # fmt: skip
    pipeline_class = type(model.pipeline())
    layers, metadata, kohya = {}, {}, {}
    for attribute in adapter.adapted:
        module = getattr(model, attribute)
        weights = _peft_weights(module)
        layers[f'{attribute}_lora_layers'] = _diffusers_layout(weights, convert_state_dict_to_diffusers)
        metadata[f'{attribute}_lora_adapter_metadata'] = module.peft_config[ADAPTER_NAME].to_dict()
        if kohya_file:
            prefix = KOHYA_PREFIXES[attribute]
            if attribute == 'text_encoder' and getattr(model, 'text_encoder_2', None) is not None:
                prefix = 'lora_te1'
            kohya.update(_kohya_weights(weights, prefix, adapter.alpha))
    accepted = inspect.signature(pipeline_class.save_lora_weights).parameters
    metadata = {k: v for k, v in metadata.items() if k in accepted}
    os.makedirs(out_dir, exist_ok=True)
    pipeline_class.save_lora_weights(out_dir, **layers, **metadata, weight_name=LORA_WEIGHTS, safe_serialization=True)
    written = {'lora': os.path.join(out_dir, LORA_WEIGHTS)}
    config = card_kwargs.get('config')
    base_path = (config.model.get('pretrained_model_name_or_path') if config is not None else None) or None
    base_name = config.model.get('name') if config is not None else type(model).__name__
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    digest = base_digest(model, exclude=trainable)
    # The base beside diffusers' own metadata, so that diffusion.inference.lora_files.load_lora refuses another base
    # (diffusers reads only its lora_adapter_metadata key and ignores these).
    with safe_open(written['lora'], 'pt') as f:
        saved_metadata = f.metadata() or {}
    base_metadata = {'base_model': str(base_path or base_name), 'base_sha256': digest}
    save_file(load_file(written['lora']), written['lora'], metadata={**saved_metadata, **base_metadata})
    if kohya_file:
        path = os.path.join(out_dir, kohya_file)
        info = {'ss_network_dim': str(adapter.rank), 'ss_network_alpha': str(adapter.alpha),
                'base_model': str(base_path or base_name), 'base_sha256': digest}  # fmt: skip
        save_file(kohya, path, metadata=info)
        written['kohya'] = path
    if model_card:
        card = write_model_card(model, out_dir, **card_kwargs)
        base = base_path or f'{base_name} (built from its config and seed)'
        with open(card, 'a') as f:
            f.write(
                '\n## LoRA adapter\n\n'
                f'This folder holds a LoRA adapter, not a full model. Base model: {base}; SHA-256 of its weights '
                f'(diffusion.models.lora.base_digest): `{digest}`. Rank {adapter.rank}, alpha {adapter.alpha:g}, on '
                f'{", ".join(adapter.adapted)}. Files: `{LORA_WEIGHTS}` (diffusers: '
                f'`{pipeline_class.__name__}.from_pretrained(<base>).load_lora_weights("<this folder>")`)'
                + (f' and `{kohya_file}` (kohya / ComfyUI layout)' if kohya_file else '')
                + '. The training data and its license mix are stated above: they apply to the adapter.\n'
            )
        written['model_card'] = card
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m diffusion.inference.export', description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', required=True, help='Composer checkpoint (path or URI) or diffusers folder.')
    parser.add_argument('--config', help='Training yaml, when the checkpoint embeds none and has no run config.yaml.')
    parser.add_argument('--out', required=True, help='Output folder for the diffusers pipeline and README.md.')
    parser.add_argument('--single-file', help='Also write this single-file .safetensors (ComfyUI, A1111).')
    parser.add_argument('--no-ema', action='store_true', help='Export the training weights even if EMA exists.')
    parser.add_argument('--provenance', help='provenance.json of the training data (default: beside the data).')
    parser.add_argument(
        '--force-provenance',
        action='store_true',
        help='Use --provenance even though its dataset fingerprint differs from the training data the checkpoint '
        'records; the card states the license mix as unverified.',
    )
    parser.add_argument('--attribution-url', help='Public URL of the attribution manifest, linked in the card.')
    parser.add_argument('--name', help='Model name in the card (default: the run name).')
    parser.add_argument('--dtype', choices=list(DTYPES), default='fp32')
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument(
        '--lora',
        action='store_true',
        help=f'Write the LoRA adapter alone ({LORA_WEIGHTS} for diffusers load_lora_weights, and the model card) '
        'instead of a pipeline; the checkpoint must hold one lora adapter.',
    )
    adapter.add_argument(
        '--fused',
        action='store_true',
        help='Write the pipeline with the adapters merged into the base weights (what a plain export of an adapter '
        'checkpoint does), and refuse a checkpoint that has no adapters.',
    )
    parser.add_argument(
        '--kohya',
        metavar='NAME',
        help='With --lora: also write the adapter in the kohya / ComfyUI layout as this file in --out (SD1/SD2/SDXL).',
    )
    parser.add_argument('--device', default='cpu')
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, str]:
    """Command line; see ``--help``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kohya and not args.lora:
        parser.error('--kohya writes the LoRA adapter in the kohya layout: add --lora')
    if args.lora and (args.single_file or args.dtype != 'fp32'):
        parser.error('--lora writes the adapter alone, in fp32: --single-file and --dtype apply to pipeline exports')
    if args.kohya and os.path.dirname(args.kohya):
        parser.error(f'--kohya {args.kohya}: give a file name, written in --out')
    if args.provenance is not None and not os.path.isfile(args.provenance):
        raise SystemExit(f'error: --provenance {args.provenance} does not exist')
    try:  # before the model loads, which takes minutes for SD2
        check_writable_folder(args.out, what='--out')
        if args.single_file and os.path.dirname(args.single_file):  # a bare name goes into --out
            check_writable_folder(os.path.dirname(args.single_file), what='--single-file')
    except ConfigError as error:
        raise SystemExit(f'error: {error}') from None
    loaded = load_checkpoint(args.checkpoint, args.config, use_ema=not args.no_ema, device=args.device)
    print(f'Loaded {loaded.describe()}')
    adapters = [getattr(a, 'name', '') or type(a).__name__ for a in getattr(loaded.model, 'adapters', None) or []]
    if args.fused and not adapters:
        raise SystemExit(
            f'error: --fused: {args.checkpoint} has no adapters to merge (its model.adapters is empty); export it '
            'without --fused.'
        )
    card_kwargs = dict(
        config=loaded.config,
        provenance=args.provenance,
        data_fingerprint=loaded.data_fingerprint,
        force_provenance=args.force_provenance,
        attribution_url=args.attribution_url,
        weights=loaded.weights,
        batch=loaded.batch,
        name=args.name,
    )
    if args.lora:
        if adapters != ['lora']:
            raise SystemExit(
                f'error: --lora: {args.checkpoint} needs one lora adapter (model.adapters: {{lora: ...}}); it has '
                f'{adapters or "none"}.'
            )
        try:
            written = export_lora(loaded.model, args.out, kohya_file=args.kohya, **card_kwargs)
        except (ProvenanceMismatchError, ValueError) as error:
            raise SystemExit(f'error: {error}') from None
        for what, path in written.items():
            print(f'{what}: {path}')
        return written
    try:
        written = export_model(loaded.model, args.out, dtype=args.dtype, single_file=args.single_file, **card_kwargs)
    except ProvenanceMismatchError as error:
        raise SystemExit(f'error: {error}') from None
    for what, path in written.items():
        print(f'{what}: {path}')
    return written


if __name__ == '__main__':
    main()
