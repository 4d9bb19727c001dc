"""A local app to try a model: ``python -m diffusion.inference.app --checkpoint RUN_CHECKPOINT`` or ``--pipeline
EXPORT_FOLDER``, with ``--lora LORA_FOLDER_OR_FILE`` to add an adapter.

A page in the browser takes a prompt (and an optional negative prompt), a seed, the number of steps, the guidance
scale, the sampler (the names the model's objective accepts, as for ``python -m diffusion.inference.sample``), the
width and height, and, when the model carries a LoRA, a switch and a scale for it; it shows the images. Image ``i``
of a request is the model's own ``generate`` for the seed ``seed + i``, rounded to 8 bits as the sampling CLI rounds
(:func:`diffusion.inference.sample.to_uint8`) and served as PNG, so what the page shows is what ``generate`` and the
sampling CLI give for the same settings.

Built on Gradio (``gradio.Blocks``; an optional extra, ``pip install -e '.[app]'``): it is what the field's model
demos use, and its page, queue (one generation at a time, since every request shares the model) and image serving
are taken as they are. It was chosen over extending the human study's Flask app because nothing of that app (pairs,
votes) would be reused, while Gradio gives the controls, the gallery and the error display. Only the page code
imports it; :class:`Playground`, which does the work, does not.

Models load through :func:`diffusion.inference.loading.load_checkpoint`, so a Composer checkpoint is unpickled only
when its SHA-256 manifest is signed with the checkpoint key, and an export folder is read with
``use_safetensors=True``. A LoRA is either the one a LoRA run's checkpoint carries, or a diffusers LoRA file (what
:func:`diffusion.inference.export.export_lora` writes, ``pytorch_lora_weights.safetensors``, or a kohya / ComfyUI
``.safetensors`` file) added to the model's own networks with the pipeline class's ``load_lora_weights`` (diffusers,
on peft); only ``.safetensors`` files are read. The switch and the scale act on peft's LoRA layers
(``BaseTunerLayer.enable_adapters`` and ``LoraLayer.set_scale``): at scale ``s`` a layer adds ``s * alpha / rank *
B @ A x`` to its base output, so scale 1 is the adapter as trained and scale 0 the base model.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from diffusion.inference.export import LORA_WEIGHTS
from diffusion.inference.loading import LoadedModel, is_diffusers_folder, load_checkpoint
from diffusion.inference.lora_files import ADAPTER_NAME, load_lora
from diffusion.inference.sample import to_uint8

__all__ = [
    'APP_ADAPTER',
    'MAX_IMAGES',
    'Playground',
    'build_app',
    'load',
    'load_lora_file',
    'main',
    'serve',
    'size_multiple',
]

#: peft's adapter name for a LoRA file the app adds (a LoRA run's own adapter keeps its name, ``default``).
APP_ADAPTER = ADAPTER_NAME  # the adapter name of a LoRA file load_lora adds
#: Images per request at most.
MAX_IMAGES = 4
#: Pipelines whose ``check_inputs`` wants sides divisible by 8 whatever the autoencoder's factor (diffusers 0.39);
#: SD3's pipeline checks the factor times the patch size, which is the model's ``resolution_multiple``.
_PIPELINE_MULTIPLE = {'StableDiffusionPipeline': 8, 'StableDiffusionXLPipeline': 8}


def size_multiple(model: Any) -> int:
    """What image sides must be multiples of: the model's ``resolution_multiple`` (autoencoder factor times patch
    size), and 8 for the SD and SDXL pipelines, which require it."""
    pipeline = model.conditioner.pipeline_class.__name__
    return math.lcm(int(model.resolution_multiple), _PIPELINE_MULTIPLE.get(pipeline, 1))


def _lora_layers(model: Any) -> list[Any]:
    from diffusion.models.lora import lora_layers

    return [layer for _, layer in lora_layers(model)]


def load_lora_file(model: Any, path: str) -> str:
    """Add the LoRA of ``path`` to ``model``'s networks with :func:`~diffusion.inference.lora_files.load_lora`
    (diffusers' ``load_lora_weights`` on a pipeline that shares them, the whole file or a one-line refusal) under the
    adapter name :data:`APP_ADAPTER`; returns the file read.

    Args:
        model: A model with ``pipeline()`` and no LoRA yet.
        path (str): A folder holding ``pytorch_lora_weights.safetensors`` (an ``export_lora`` folder), or a
            ``.safetensors`` LoRA file (diffusers or kohya / ComfyUI layout).
    """
    if _lora_layers(model):
        raise ValueError(f'--lora {path}: the model already carries a LoRA (its run trained one); give one of the two.')
    if os.path.isdir(path):
        folder, weight_name = path, LORA_WEIGHTS
        if not os.path.isfile(os.path.join(folder, weight_name)):
            raise FileNotFoundError(
                f'--lora {path}: the folder has no {LORA_WEIGHTS}; give an export_lora folder or a .safetensors file.'
            )
    elif os.path.isfile(path):
        if not path.endswith('.safetensors'):
            raise ValueError(f'--lora {path}: only .safetensors LoRA files are read (nothing pickled); got another.')
        folder, weight_name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    else:
        raise FileNotFoundError(f'--lora {path}: no such file or folder.')
    pipe = model.pipeline()
    if not hasattr(pipe, 'load_lora_weights'):
        raise ValueError(f'--lora {path}: {type(pipe).__name__} cannot load LoRA weights.')
    # The sampling CLI's loader: the whole file or nothing, refused in one line when it names another base (its
    # recorded base SHA-256), holds keys that match no layer or weights of other shapes.
    load_lora(model, folder, weight_name=weight_name)
    if not _lora_layers(model):
        raise ValueError(f'--lora {path}: no weight of the file fits a layer of the model; is it for another base?')
    model.eval()  # the new layers (dropout) were made in training mode
    return os.path.join(folder, weight_name)


@dataclass
class Request:
    """The settings of one request, checked; see :meth:`Playground.request`."""

    prompt: str
    negative_prompt: Optional[str]
    seed: int
    steps: int
    guidance_scale: float
    scheduler: str
    width: int
    height: int
    num_images: int
    lora: bool
    lora_scale: float


class Playground:
    """Sampling for the app: checks a request's settings and draws its images with the model's ``generate``.

    Args:
        model: A model with ``generate`` (e.g. :class:`~diffusion.models.StableDiffusion`), in eval mode.
        description (str): What was loaded, shown on the page. Default: the model's class name.
        lora_source (str, optional): Where the LoRA came from, shown on the page; default: the model's own when it
            carries one.
    """

    def __init__(self, model: Any, description: str = '', lora_source: Optional[str] = None):
        self.model = model
        self.description = description or type(model).__name__
        self.layers = _lora_layers(model)
        self.adapter = self._adapter_name() if self.layers else None
        self.lora_source = lora_source if self.layers else None
        if self.layers and self.lora_source is None:
            self.lora_source = 'trained with the model'
        self._lock = threading.Lock()  # the LoRA switch and scale are state of the shared model

    def _adapter_name(self) -> str:
        names = {name for layer in self.layers for name in layer.scaling}
        if len(names) != 1:
            raise ValueError(f'The model carries {len(names)} LoRA adapters ({sorted(names)}); the app handles one.')
        return names.pop()

    @property
    def has_lora(self) -> bool:
        return self.adapter is not None

    @property
    def schedulers(self) -> list[str]:
        return list(self.model.objective.scheduler_names)

    @property
    def default_scheduler(self) -> str:
        return self.model.objective.default_scheduler

    @property
    def multiple(self) -> int:
        return size_multiple(self.model)

    @property
    def default_size(self) -> int:
        return int(self.model.default_image_size)

    def request(
        self,
        prompt: str,
        negative_prompt: Optional[str] = None,
        seed: int = 0,
        steps: int = 30,
        guidance_scale: float = 7.5,
        scheduler: Optional[str] = None,
        width: Optional[int] = None,
        height: Optional[int] = None,
        num_images: int = 1,
        lora: bool = True,
        lora_scale: float = 1.0,
    ) -> Request:
        """The settings checked, with defaults filled in; a bad one raises ``ValueError`` naming it."""
        scheduler = scheduler or self.default_scheduler
        if scheduler not in self.schedulers:
            raise ValueError(
                f'scheduler {scheduler!r}: not a sampler of this model; one of {", ".join(self.schedulers)}.'
            )
        sizes = {
            name: self.default_size if value is None else value
            for name, value in (('width', width), ('height', height))
        }
        for name, value in sizes.items():
            if value != int(value) or int(value) < 1 or int(value) % self.multiple:
                lower = max(self.multiple, int(value) // self.multiple * self.multiple)
                raise ValueError(
                    f'{name} {value:g}: must be a positive multiple of {self.multiple} for this model, e.g. {lower} '
                    f'or {lower + self.multiple}.'
                )
        for name, value, low in (('steps', steps, 1), ('num_images', num_images, 1)):
            if value != int(value) or int(value) < low:
                raise ValueError(f'{name} {value}: must be a whole number of at least {low}.')
        if int(num_images) > MAX_IMAGES:
            raise ValueError(f'num_images {num_images}: at most {MAX_IMAGES} per request.')
        if seed != int(seed) or int(seed) < 0:
            raise ValueError(f'seed {seed}: must be a whole number of at least 0.')
        if not math.isfinite(float(guidance_scale)) or not math.isfinite(float(lora_scale)):
            raise ValueError(f'guidance {guidance_scale} and LoRA scale {lora_scale} must be finite numbers.')
        return Request(
            prompt=str(prompt or ''),
            negative_prompt=negative_prompt or None,
            seed=int(seed),
            steps=int(steps),
            guidance_scale=float(guidance_scale),
            scheduler=scheduler,
            width=int(sizes['width']),
            height=int(sizes['height']),
            num_images=int(num_images),
            lora=bool(lora) and self.has_lora,
            lora_scale=float(lora_scale),
        )

    def set_lora(self, enabled: bool, scale: float = 1.0) -> None:
        """Switch the LoRA on at ``scale`` (1: as trained, 0: no effect) or off; nothing when there is none."""
        for layer in self.layers:
            layer.enable_adapters(bool(enabled))
            if enabled:
                layer.set_scale(self.adapter, float(scale))

    def images(self, request: Request) -> torch.Tensor:
        """The request's images (N, 3, H, W) in [0, 1], as ``generate`` gives them: image ``i`` has seed
        ``seed + i``."""
        count = request.num_images
        negatives = None if request.negative_prompt is None else [request.negative_prompt] * count
        with self._lock:
            self.set_lora(request.lora, request.lora_scale)
            return self.model.generate(
                [request.prompt] * count,
                negative_prompts=negatives,
                guidance_scale=request.guidance_scale,
                num_inference_steps=request.steps,
                seed=[request.seed + i for i in range(count)],
                height=request.height,
                width=request.width,
                scheduler=request.scheduler,
            )

    def generate(self, prompt: str, **settings: Any) -> list[Image.Image]:
        """8-bit images for ``prompt`` and ``settings`` (those of :meth:`request`), rounded as the sampling CLI
        rounds its PNGs."""
        return [Image.fromarray(to_uint8(image)) for image in self.images(self.request(prompt, **settings))]


def _caption(request: Request, index: int) -> str:
    lora = f', LoRA {request.lora_scale:g}' if request.lora else ''
    settings = f'{request.steps} steps, {request.scheduler}, guidance {request.guidance_scale:g}'
    return f'seed {request.seed + index}, {settings}{lora}'


def build_app(playground: Playground) -> Any:
    """The Gradio page (``gradio.Blocks``) for ``playground``; ``launch()`` serves it."""
    import gradio as gr

    multiple = playground.multiple
    with gr.Blocks(title='Try a model', analytics_enabled=False) as app:
        lora_line = f'\n\nLoRA: {playground.lora_source}' if playground.has_lora else ''
        gr.Markdown(f'### Try a model\n{playground.description}{lora_line}', elem_id='model')
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label='Prompt', lines=2, elem_id='prompt')
                negative = gr.Textbox(label='Negative prompt (optional)', elem_id='negative-prompt')
                with gr.Row():
                    seed = gr.Number(label='Seed', value=0, precision=0, minimum=0, elem_id='seed')
                    count = gr.Slider(1, MAX_IMAGES, value=1, step=1, label='Images', info='seeds seed, seed + 1, ...',
                                      elem_id='num-images')  # fmt: skip
                with gr.Row():
                    steps = gr.Slider(1, 150, value=30, step=1, label='Steps', elem_id='steps')
                    guidance = gr.Slider(0, 20, value=7.5, step=0.1, label='Guidance scale', elem_id='guidance')
                scheduler = gr.Dropdown(playground.schedulers, value=playground.default_scheduler, label='Scheduler',
                                        elem_id='scheduler')  # fmt: skip
                with gr.Row():
                    size = dict(value=playground.default_size, precision=0, minimum=multiple, step=multiple)
                    width = gr.Number(label=f'Width (a multiple of {multiple})', elem_id='width', **size)
                    height = gr.Number(label=f'Height (a multiple of {multiple})', elem_id='height', **size)
                with gr.Row(visible=playground.has_lora):
                    lora = gr.Checkbox(value=True, label='LoRA', elem_id='lora')
                    lora_scale = gr.Slider(0, 2, value=1.0, step=0.05, label='LoRA scale', elem_id='lora-scale')
                button = gr.Button('Generate', variant='primary', elem_id='generate')
            with gr.Column(scale=3):
                gallery = gr.Gallery(label='Images', format='png', columns=2, elem_id='images', interactive=False)

        def run(*values: Any) -> list[tuple[Image.Image, str]]:
            names = ('prompt', 'negative_prompt', 'seed', 'steps', 'guidance_scale', 'scheduler', 'width', 'height',
                     'num_images', 'lora', 'lora_scale')  # fmt: skip
            settings = {name: value for name, value in zip(names, values) if value is not None}  # empty: default
            try:
                request = playground.request(**settings)
            except ValueError as error:
                raise gr.Error(str(error)) from None
            images = playground.images(request)
            return [(Image.fromarray(to_uint8(image)), _caption(request, i)) for i, image in enumerate(images)]

        inputs = [prompt, negative, seed, steps, guidance, scheduler, width, height, count, lora, lora_scale]
        button.click(run, inputs=inputs, outputs=gallery, concurrency_limit=1)
        prompt.submit(run, inputs=inputs, outputs=gallery, concurrency_limit=1)
        # Load events run once the page has mounted its controls: before that, typed values can be lost. The mark
        # is what a browser test (tests/inference/test_app.py) waits for before it types.
        app.load(None, js="() => { document.body.dataset.appReady = 'true'; }")
    return app


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def load(
    checkpoint: Optional[str] = None,
    pipeline: Optional[str] = None,
    lora: Optional[str] = None,
    config: Optional[str] = None,
    use_ema: bool = True,
    device: str = 'cpu',
) -> Playground:
    """A :class:`Playground` for a Composer checkpoint or an export folder (one of the two), and a LoRA file."""
    if (checkpoint is None) == (pipeline is None):
        raise ValueError('Give one of --checkpoint (a Composer checkpoint) and --pipeline (an export folder).')
    if pipeline is not None and not is_diffusers_folder(pipeline):
        raise FileNotFoundError(f'--pipeline {pipeline}: no model_index.json there; give a diffusers export folder.')
    loaded: LoadedModel = load_checkpoint(checkpoint or pipeline, config, use_ema=use_ema, device=device)
    lora_source = load_lora_file(loaded.model, lora) if lora is not None else None
    return Playground(loaded.model, loaded.describe(), lora_source)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m diffusion.inference.app', description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--checkpoint', help='Composer checkpoint (path or URI) with its signed manifest.')
    source.add_argument('--pipeline', help='Exported diffusers pipeline folder (export_model).')
    parser.add_argument('--lora', help='LoRA folder (export_lora) or .safetensors file to add to the model.')
    parser.add_argument('--config', help='Training yaml, when the checkpoint embeds none and has no run config.yaml.')
    parser.add_argument('--no-ema', action='store_true', help='Use the training weights even if EMA weights exist.')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--host', default='127.0.0.1', help='Address to serve on. Default: this machine only.')
    parser.add_argument('--port', type=int, default=7860, help='Port; 0 picks a free one. Default: 7860.')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line; see ``--help``. Serves until interrupted."""
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("error: the app needs Gradio: pip install -e '.[app]'") from None
    try:
        playground = load(args.checkpoint, args.pipeline, args.lora, args.config, not args.no_ema, args.device)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f'error: {error}') from None
    print(f'Loaded {playground.description}' + (f'; LoRA {playground.lora_source}' if playground.has_lora else ''))
    serve(playground, args.host, args.port)


def serve(playground: Playground, host: str = '127.0.0.1', port: int = 7860, block: bool = True) -> Any:
    """Serve the page of ``playground`` on ``host:port`` (port 0: a free one) and print its address; with ``block``
    until interrupted, else return the running ``gradio.Blocks`` (``close()`` stops it)."""
    app = build_app(playground)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port or _free_port(host), prevent_thread_lock=True, quiet=True,
               ssr_mode=False, show_error=True, theme=_theme())  # fmt: skip
    print(f'Serving on {app.local_url}', flush=True)
    if not block:
        return app
    try:
        app.block_thread()
    finally:
        app.close()
    return app


def _theme() -> Any:
    """Gradio's default theme with the system's fonts: the page asks no server but this one for anything."""
    import gradio as gr

    return gr.themes.Default(font=['system-ui', 'sans-serif'], font_mono=['ui-monospace', 'monospace'])


if __name__ == '__main__':
    main()
