"""The model card (``README.md``) of an exported model: what it is, how it was trained, and on whose images.

A CommonCanvas model is only as shareable as the licenses of its training images allow, so the card states the
license mix read from the data pipeline's provenance report (``provenance.json``, written by
:func:`diffusion.pipeline.report.write_report`: ``final.licenses`` counts the images of the final dataset per
license), links the attribution manifest written beside it (``ATTRIBUTION.txt`` / ``attribution.jsonl``), and
derives the obligations from the license elements: BY asks for attribution, NC forbids commercial use, SA and ND
are flagged for legal review. Without a report the card says the mix is unknown; it never guesses one. The card
starts with the YAML metadata block that the Hugging Face Hub reads (``library_name``, ``pipeline_tag``, ``tags``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from composer.utils import parse_uri
from omegaconf import DictConfig, OmegaConf

__all__ = ['find_provenance', 'license_obligations', 'read_license_mix', 'render_model_card', 'write_model_card']

ATTRIBUTION_FILES = ('ATTRIBUTION.txt', 'attribution.jsonl')
PROVENANCE_FILE = 'provenance.json'


def find_provenance(config: Optional[DictConfig]) -> tuple[Optional[str], list[str]]:
    """The ``provenance.json`` of the training data named by ``config``, and the paths searched.

    Looks in the training data's ``remote`` folder, its ``report`` subfolder, and the same two places one folder up
    (the pipeline's README layout: ``data/x/captioned`` with the report in ``data/x/report``). Object-store data are
    not searched: pass ``--provenance``.
    """
    data = (config or {}).get('train_dataloader') or {}
    remote = data.get('remote') or data.get('local')
    if not remote or parse_uri(str(remote))[0]:
        return None, []
    folder = os.path.abspath(str(remote))
    searched = []
    for base in (folder, os.path.dirname(folder)):
        for sub in ('', 'report'):
            searched.append(os.path.join(base, sub, PROVENANCE_FILE))
    return next((path for path in searched if os.path.isfile(path)), None), searched


def read_license_mix(provenance: str) -> dict[str, int]:
    """Images per license of the final dataset, from a ``provenance.json`` (largest first).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: It is not a provenance report (no ``final.licenses``).
    """
    if not os.path.isfile(provenance):
        raise FileNotFoundError(f'Provenance report not found: {provenance}')
    with open(provenance, encoding='utf-8') as f:
        report = json.load(f)
    licenses = (report.get('final') or {}).get('licenses') if isinstance(report, dict) else None
    if not isinstance(licenses, dict):
        raise ValueError(
            f'{provenance} is not a provenance report of diffusion.pipeline (expected "final": {{"licenses": ...}}).'
        )
    return dict(sorted(((str(k), int(v)) for k, v in licenses.items()), key=lambda kv: (-kv[1], kv[0])))


def _elements(license_id: str) -> set[str]:
    return set(license_id.upper().replace('.', '-').split('-'))


# License element -> the obligation it brings, with ``{share}`` for how many training images carry it.
_OBLIGATIONS = (
    (
        'BY',
        '**Attribution (CC BY):** {share} are under licenses that require crediting their authors. Distribute the '
        'attribution manifest with the model and keep this card with it.',
    ),
    (
        'NC',
        '**Non-commercial (NC):** {share} are under non-commercial licenses; the model inherits the restriction and '
        'must not be used for commercial purposes.',
    ),
    (
        'SA',
        '**ShareAlike (SA):** {share} are under ShareAlike licenses; whether the model is an adaptation that must be '
        'shared under the same terms is unsettled: have it reviewed before release.',
    ),
    (
        'ND',
        '**NoDerivatives (ND):** {share} forbid sharing adaptations; have it reviewed before releasing the model.',
    ),
)


def license_obligations(licenses: dict[str, int]) -> list[str]:
    """What users of a model trained on ``licenses`` must do, one sentence per obligation."""
    total = sum(licenses.values())
    lines = []
    for element, sentence in _OBLIGATIONS:
        count = sum(n for lic, n in licenses.items() if element in _elements(lic))
        if count:
            lines.append(sentence.format(share=f'{count:,} of {total:,} images ({100 * count / max(total, 1):.1f}%)'))
    if not lines:
        lines.append('The training images are public domain or CC0: no attribution or use restriction applies.')
    return lines


def _parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters()) if hasattr(module, 'parameters') else 0


def _training_lines(config: Optional[DictConfig], weights: Optional[str], batch: Optional[int]) -> list[str]:
    weights_text = {'ema': 'the EMA average of the weights', 'training': 'the training weights (no EMA average)'}
    lines = []
    if config is not None:
        data = config.get('train_dataloader') or {}
        algorithms = config.get('algorithms') or {}
        optimizer = config.get('optimizer') or {}
        lines += [
            f'- Run: `{config.get("run_name")}`, model `{config.model.get("name")}`',
            f'- Duration: {config.get("max_duration")}' + (f' (checkpoint at batch {batch:,})' if batch else ''),
            f'- Global batch size: {data.get("batch_size", "unknown")}',
            f'- Resolution: {data.get("resolution", "unknown (precomputed latents)")}',
            f'- Optimizer: {optimizer.get("name")}, learning rate {optimizer.get("lr")}',
            f'- Precision: {config.get("precision") or "fp32"}',
        ]
        if 'ema' in algorithms:
            ema = OmegaConf.to_container(algorithms['ema']) if isinstance(algorithms['ema'], DictConfig) else {}
            settings = ', '.join(f'{k}={v}' for k, v in (ema or {}).items())
            lines.append(f'- EMA: yes ({settings or "defaults"})')
        else:
            lines.append('- EMA: no')
    else:
        lines.append('- The training config was not available to the export (e.g. made from a diffusers folder).')
    if weights in weights_text:
        lines.append(f'- Exported weights: {weights_text[weights]}')
    return lines


def _link(target: str, out_dir: str) -> str:
    if parse_uri(target)[0] or target.startswith(('http://', 'https://')):
        return target
    return os.path.relpath(os.path.abspath(target), os.path.abspath(out_dir))


def _data_section(provenance: Optional[str], searched: list[str], attribution_url: Optional[str], out_dir: str):
    if provenance is None:
        where = f' (searched {", ".join(searched)})' if searched else ''
        return [
            'The license mix of the training data is **unknown**: no provenance report was given (`--provenance`) '
            f'or found beside the training data{where}. Do not publish this model before its data are accounted '
            'for.',
        ], None
    licenses = read_license_mix(provenance)
    total = sum(licenses.values())
    lines = [
        f'{total:,} images, each under a Creative-Commons license or in the public domain '
        f'(from the provenance report [`{os.path.basename(provenance)}`]({_link(provenance, out_dir)})):',
        '',
        '| license | images | share |',
        '|---|---:|---:|',
    ]
    lines += [f'| {lic} | {n:,} | {100 * n / max(total, 1):.1f}% |' for lic, n in licenses.items()]
    lines += [f'| **total** | {total:,} | 100% |', '']
    manifests = [os.path.join(os.path.dirname(provenance), name) for name in ATTRIBUTION_FILES]
    links = [f'[`{os.path.basename(m)}`]({_link(m, out_dir)})' for m in manifests if os.path.isfile(m)]
    if attribution_url:
        links.insert(0, f'<{attribution_url}>')
    if links:
        lines.append(f'Attribution manifest (title, author, license and source of every image): {", ".join(links)}.')
    else:
        lines.append(f'**No attribution manifest** was found beside {provenance}; it must accompany the model.')
    return lines, licenses


def render_model_card(
    model: Any,
    out_dir: str,
    *,
    name: Optional[str] = None,
    config: Optional[DictConfig] = None,
    provenance: Optional[str] = None,
    attribution_url: Optional[str] = None,
    weights: Optional[str] = None,
    batch: Optional[int] = None,
    single_file: Optional[str] = None,
    dtype: str = 'fp32',
) -> str:
    """The text of the model card; see :func:`write_model_card`."""
    searched: list[str] = []
    if provenance is None:
        provenance, searched = find_provenance(config)
    pipeline = model.pipeline()
    pipeline_class = type(pipeline).__name__
    name = name or (config.get('run_name') if config is not None else None) or os.path.basename(out_dir.rstrip('/'))
    components = {k: v for k, v in pipeline.components.items() if _parameters(v)}
    total = sum(_parameters(v) for v in components.values())
    data_lines, licenses = _data_section(provenance, searched, attribution_url, out_dir)
    non_commercial = licenses is not None and any('NC' in _elements(lic) for lic in licenses)
    objective = model.objective.describe()
    size = model.default_image_size

    lines = [
        '---',
        'library_name: diffusers',
        'pipeline_tag: text-to-image',
        'license: other',
        'tags: [text-to-image, diffusers, commoncanvas, creative-commons]',
        '---',
        '',
        f'# {name}',
        '',
        f'A latent text-to-image diffusion model ({type(model).__name__}, exported as a diffusers '
        f'`{pipeline_class}` in {dtype}) trained on Creative-Commons images with the CommonCanvas recipe '
        '(Gokaslan et al., 2023).',
        '',
        '## Architecture',
        '',
        '| component | class | parameters |',
        '|---|---|---:|',
    ]
    lines += [f'| {k} | {type(v).__name__} | {_parameters(v):,} |' for k, v in components.items()]
    lines += [
        f'| **total** | | {total:,} |',
        '',
        f'Objective {objective["objective"]}, prediction type `{objective["prediction_type"]}`; native resolution '
        f'{size}x{size} pixels; default sampler `{model.objective.default_scheduler}`.',
        '',
        '## Training',
        '',
        *_training_lines(config, weights, batch),
        '',
        '## Training data and licenses',
        '',
        *data_lines,
        '',
        '## License obligations',
        '',
    ]
    if licenses is None:
        lines.append('Unknown: they follow from the license mix of the training data, which is not known.')
    else:
        lines += [f'- {line}' for line in license_obligations(licenses)]
    lines += [
        '',
        '## Intended use and limitations',
        '',
        '- Research on generative models and creative tools'
        + (', non-commercial only' if non_commercial else '')
        + '; images should be disclosed as generated.',
        '- Trained only on openly licensed images, with synthetic captions: the model knows fewer celebrities, '
        'brands and artworks than models trained on web scrapes, and can follow long or unusual prompts poorly.',
        '- It can reproduce biases of its training images and captioner; no safety checker is included.',
        '- Not for generating images of real people or content that deceives or harms.',
        '',
        '## Usage',
        '',
        '```python',
        f'from diffusers import {pipeline_class}',
        '',
        f"pipe = {pipeline_class}.from_pretrained('path/to/this/folder')",
        "image = pipe('a lighthouse on a cliff at sunset', num_inference_steps=50, guidance_scale=7.5).images[0]",
        "image.save('lighthouse.png')",
        '```',
    ]
    if single_file:
        lines += [
            '',
            f'`{single_file}` holds the same weights in the original single-file layout (ComfyUI, A1111/Forge); '
            'diffusers reads it with '
            f"`{pipeline_class}.from_single_file('{single_file}', config='path/to/this/folder')`.",
        ]
    return '\n'.join(lines) + '\n'


def write_model_card(model: Any, out_dir: str, **kwargs: Any) -> str:
    """Write ``<out_dir>/README.md`` and return its path.

    Args:
        model: The exported model (a :class:`~diffusion.models.StableDiffusion`: ``pipeline()``, ``objective``,
            ``default_image_size``).
        out_dir (str): The export folder; links in the card are relative to it.
        **kwargs: ``name`` (title; default: the run name), ``config`` (the training config, for the training
            summary and the provenance lookup), ``provenance`` (path of ``provenance.json``; default: looked up
            beside the training data), ``attribution_url`` (a public copy of the manifest), ``weights``
            (``'ema'``/``'training'``), ``batch`` (checkpoint batch), ``single_file`` (its file name), ``dtype``.
    """
    text = render_model_card(model, out_dir, **kwargs)
    path = os.path.join(out_dir, 'README.md')
    os.makedirs(out_dir, exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    return path
