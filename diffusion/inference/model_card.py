"""The model card (``README.md``) of an exported model: what it is, how it was trained, and on whose images.

A CommonCanvas model is only as shareable as the licenses of its training images allow, so the card states the
license mix read from the data pipeline's provenance report (``provenance.json``, written by
:func:`diffusion.pipeline.report.write_report`: ``final.licenses`` counts the images of the final dataset per
license), ships the report and the attribution manifest written beside it (``ATTRIBUTION.txt`` /
``attribution.jsonl``) in the export folder and links them there, and derives the obligations from the license
elements: BY asks for attribution, NC forbids commercial use, SA and ND are flagged for legal review. The card
starts with the YAML metadata block that the Hugging Face Hub reads (``library_name``, ``pipeline_tag``, ``tags``).

A report is only stated as the model's license mix when it provably describes the data the model trained on: the
report records the fingerprint of its dataset (``final.fingerprint``) and the checkpoint the fingerprint of the
training data (:mod:`diffusion.data.fingerprint`, in the dataset state Composer saves), and the two must be equal
(same ``index.json`` digest and sample count per stream). A report given explicitly that does not match is refused
(:class:`ProvenanceMismatchError`) unless forced, and the card then says the mix is unverified; a report found beside
the training data that does not match is not used, and the card says the mix is unknown. It never guesses one.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

from composer.utils import parse_uri
from omegaconf import DictConfig, OmegaConf

from diffusion.data.fingerprint import fingerprint_mismatches, format_stream

__all__ = [
    'ProvenanceMismatchError',
    'check_attribution_url',
    'check_provenance',
    'describe_fingerprint',
    'find_provenance',
    'license_obligations',
    'provenance_mismatch',
    'read_license_mix',
    'render_model_card',
    'write_model_card',
]

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


class ProvenanceMismatchError(ValueError):
    """A provenance report cannot be shown to describe the data the model was trained on."""


def describe_fingerprint(fingerprint: list[dict[str, Any]]) -> str:
    """``'data/x/captioned (16 samples, index.json sha256 3f2a9c01d4e5)'``, streams joined by ``'; '``."""
    return '; '.join(f'{entry["location"]} ({format_stream(entry)})' for entry in fingerprint)


def _report_fingerprint(provenance: str) -> Optional[list[dict[str, Any]]]:
    with open(provenance, encoding='utf-8') as f:
        report = json.load(f)
    fingerprint = (report.get('final') or {}).get('fingerprint') if isinstance(report, dict) else None
    return fingerprint or None


def provenance_mismatch(provenance: str, data_fingerprint: Optional[list[dict[str, Any]]]) -> Optional[str]:
    """Why the report ``provenance`` cannot be shown to describe the training data; ``None`` when it does.

    Args:
        provenance (str): A ``provenance.json`` of :mod:`diffusion.pipeline.report`.
        data_fingerprint (list, optional): The fingerprint of the model's training data, as its checkpoint records
            it (:attr:`~diffusion.inference.loading.LoadedModel.data_fingerprint`); ``None`` when unknown.
    """
    read_license_mix(provenance)  # a provenance report at all
    described = _report_fingerprint(provenance)
    if described is None:
        return (
            f'{provenance} records no fingerprint of the dataset it describes (written before reports recorded one: '
            'rerun python -m diffusion.pipeline report), so it cannot be verified to describe the training data'
            + (f' ({describe_fingerprint(data_fingerprint)})' if data_fingerprint else '')
        )
    if not data_fingerprint:
        return (
            f'the model records no fingerprint of its training data (a diffusers folder, or a checkpoint saved before '
            f'fingerprints were recorded), so {provenance}, which describes {describe_fingerprint(described)}, cannot '
            'be verified to describe it'
        )
    if fingerprint_mismatches(data_fingerprint, described):
        return (
            f'{provenance} describes {describe_fingerprint(described)}, but the model was trained on '
            f'{describe_fingerprint(data_fingerprint)}'
        )
    return None


def check_provenance(
    provenance: Optional[str], data_fingerprint: Optional[list[dict[str, Any]]], force: bool = False
) -> Optional[str]:
    """Refuse a provenance report given for a model it cannot be shown to describe, unless ``force``.

    Returns:
        Why the report is unverified (``force`` was needed), or ``None`` when it matches or none was given.

    Raises:
        ProvenanceMismatchError: The report does not match the training data and ``force`` is not set.
    """
    if provenance is None:
        return None
    problem = provenance_mismatch(provenance, data_fingerprint)
    if problem is not None and not force:
        raise ProvenanceMismatchError(
            f'{problem}. Its license mix would be a false statement about this model; pass the report of the '
            'training data, or --force-provenance to state this one as unverified.'
        )
    return problem


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


def _training_lines(
    config: Optional[DictConfig],
    weights: Optional[str],
    batch: Optional[int],
    data_fingerprint: Optional[list[dict[str, Any]]] = None,
) -> list[str]:
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
    if data_fingerprint:
        lines.append(f'- Training data (as the checkpoint records it): {describe_fingerprint(data_fingerprint)}')
    if weights in weights_text:
        lines.append(f'- Exported weights: {weights_text[weights]}')
    return lines


def check_attribution_url(attribution_url: Optional[str]) -> None:
    """Refuse an ``attribution_url`` that is not absolute: a relative link breaks once the folder is published."""
    if attribution_url is not None and not parse_uri(attribution_url)[0]:
        raise ValueError(
            f'attribution_url={attribution_url!r} is not an absolute URL (https://...): a relative link breaks once '
            'the export folder is published.'
        )


def _data_section(
    provenance: Optional[str],
    searched: list[str],
    attribution_url: Optional[str],
    problem: Optional[str],
    given: bool,
) -> tuple[list[str], Optional[dict[str, int]], list[tuple[str, str]]]:
    """The card's data section, the license mix it states (``None``: unknown) and the files to ship with it.

    The files are ``(source, name in the export folder)``: the report and its attribution manifest, which the card
    links by their name in the export folder, so the links work wherever the folder is published.
    """
    if provenance is None:
        where = f' (searched {", ".join(searched)})' if searched else ''
        return (
            [
                'The license mix of the training data is **unknown**: no provenance report was given (`--provenance`) '
                f'or found beside the training data{where}. Do not publish this model before its data are '
                'accounted for.',
            ],
            None,
            [],
        )
    if problem is not None and not given:
        return (
            [
                f'The license mix of the training data is **unknown**: the provenance report found beside the training '
                f'data (`{provenance}`) is not shown to describe it: {problem}. Do not publish this model before its '
                'data are accounted for.',
            ],
            None,
            [],
        )
    licenses = read_license_mix(provenance)
    total = sum(licenses.values())
    described = _report_fingerprint(provenance)
    lines = []
    if problem is not None:
        dataset = describe_fingerprint(described) if described else provenance
        lines += [
            f'**Unverified:** the license mix below describes {dataset}, which could not be verified to be this '
            f"model's training data ({problem}). It was stated on the exporter's word (`--force-provenance`).",
            '',
        ]
    lines += [
        f'{total:,} images, each under a Creative-Commons license or in the public domain '
        f'(from the provenance report [`{PROVENANCE_FILE}`]({PROVENANCE_FILE})'
        + (', whose dataset fingerprint matches the one the checkpoint recorded' if problem is None else '')
        + '):',
        '',
        '| license | images | share |',
        '|---|---:|---:|',
    ]
    lines += [f'| {lic} | {n:,} | {100 * n / max(total, 1):.1f}% |' for lic, n in licenses.items()]
    lines += [f'| **total** | {total:,} | 100% |', '']
    shipped = [(provenance, PROVENANCE_FILE)]
    for name in ATTRIBUTION_FILES:
        manifest = os.path.join(os.path.dirname(provenance), name)
        if os.path.isfile(manifest):
            shipped.append((manifest, name))
    links = [f'[`{name}`]({name})' for _, name in shipped[1:]]
    if attribution_url:
        links.insert(0, f'<{attribution_url}>')
    if links:
        lines.append(f'Attribution manifest (title, author, license and source of every image): {", ".join(links)}.')
    else:
        lines.append(f'**No attribution manifest** was found beside {provenance}; it must accompany the model.')
    return lines, licenses, shipped


def _usage(model: Any, pipeline_class: str) -> list[str]:
    """The card's sampling example: the conditioner's own when it needs more than a prompt (SD3's T5 mask)."""
    usage = getattr(model.conditioner, 'card_usage', None)
    if usage is not None:
        return usage()
    return [
        f'from diffusers import {pipeline_class}',
        '',
        f"pipe = {pipeline_class}.from_pretrained('path/to/this/folder')",
        "image = pipe('a lighthouse on a cliff at sunset', num_inference_steps=50, guidance_scale=7.5).images[0]",
        "image.save('lighthouse.png')",
    ]


def render_model_card(model: Any, out_dir: str, **kwargs: Any) -> str:
    """The text of the model card; see :func:`write_model_card` (which also ships the files the card links)."""
    return _render(model, out_dir, **kwargs)[0]


def _render(
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
    data_fingerprint: Optional[list[dict[str, Any]]] = None,
    force_provenance: bool = False,
) -> tuple[str, list[tuple[str, str]]]:
    check_attribution_url(attribution_url)
    given = provenance is not None
    problem = check_provenance(provenance, data_fingerprint, force_provenance)
    searched: list[str] = []
    if not given:
        provenance, searched = find_provenance(config)
        problem = provenance_mismatch(provenance, data_fingerprint) if provenance is not None else None
    pipeline = model.pipeline()
    pipeline_class = type(pipeline).__name__
    name = name or (config.get('run_name') if config is not None else None) or os.path.basename(out_dir.rstrip('/'))
    components = {k: v for k, v in pipeline.components.items() if _parameters(v)}
    total = sum(_parameters(v) for v in components.values())
    data_lines, licenses, shipped = _data_section(provenance, searched, attribution_url, problem, given)
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
        *_training_lines(config, weights, batch, data_fingerprint),
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
        *_usage(model, pipeline_class),
        '```',
    ]
    if type(model.objective).__name__ == 'RectifiedFlowObjective' and pipeline_class != 'StableDiffusion3Pipeline':
        lines += [
            '',
            f'The model was trained with rectified flow: its scheduler is `{type(pipeline.scheduler).__name__}` '
            f'(shift {objective["shift"]}), which has no `init_noise_sigma`; set `pipe.scheduler.init_noise_sigma = '
            f'1.0` before sampling with `{pipeline_class}`.',
        ]
    if single_file:
        lines += [
            '',
            f'`{single_file}` holds the same weights in the original single-file layout (ComfyUI, A1111/Forge); '
            'diffusers reads it with '
            f"`{pipeline_class}.from_single_file('{single_file}', config='path/to/this/folder')`.",
        ]
    return '\n'.join(lines) + '\n', shipped


def write_model_card(model: Any, out_dir: str, **kwargs: Any) -> str:
    """Write ``<out_dir>/README.md``, and the provenance report and attribution manifest it links; return its path.

    Args:
        model: The exported model (a :class:`~diffusion.models.StableDiffusion`: ``pipeline()``, ``objective``,
            ``default_image_size``).
        out_dir (str): The export folder. The card links only files copied into it (``provenance.json``,
            ``ATTRIBUTION.txt``, ``attribution.jsonl``) and absolute URLs, so its links work once published.
        **kwargs: ``name`` (title; default: the run name), ``config`` (the training config, for the training
            summary and the provenance lookup), ``provenance`` (path of ``provenance.json``; default: looked up
            beside the training data), ``data_fingerprint`` (the training data's fingerprint from the checkpoint,
            which the report's must equal), ``force_provenance`` (state a given report that does not match, marked
            unverified), ``attribution_url`` (a public copy of the manifest, an absolute URL), ``weights``
            (``'ema'``/``'training'``), ``batch`` (checkpoint batch), ``single_file`` (its file name), ``dtype``.

    Raises:
        ProvenanceMismatchError: ``provenance`` does not describe the training data and ``force_provenance`` is off.
    """
    text, shipped = _render(model, out_dir, **kwargs)
    os.makedirs(out_dir, exist_ok=True)
    for source, name in shipped:
        target = os.path.join(out_dir, name)
        if not (os.path.exists(target) and os.path.samefile(source, target)):
            shutil.copyfile(source, target)
    path = os.path.join(out_dir, 'README.md')
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    return path
