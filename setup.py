"""Packaging for the CommonCanvas training stack (package ``diffusion``)."""

from setuptools import find_packages, setup

# The pinned stack: checked to install and run together (see README "Install").
install_requires = [
    'torch==2.7.0',
    'torchvision==0.22.0',
    'mosaicml==0.32.1',
    'mosaicml-streaming==0.13.0',
    'transformers>=4.57,<4.58',
    'diffusers>=0.39,<0.40',
    'hydra-core>=1.3,<1.4',
    'omegaconf>=2.3,<2.4',
    'catalogue>=2.0,<3',
    # Ships the real CLIP BPE vocabulary (open_clip/bpe_simple_vocab_16e6.txt.gz) used offline.
    'open-clip-torch>=2.24',
    # CLIP's own whitespace and word patterns, used directly by diffusion.data.tokens (transformers requires it too).
    'regex',
    'pillow>=10',
    'numpy<2.3',
    'tqdm>=4.60',
    'safetensors>=0.4',
    # LoRA (the `lora` adapter and its exports): peft 0.18.1 co-installs with torch 2.7.0, transformers 4.57 and
    # diffusers 0.39 (its own requirements: torch>=1.13, transformers, accelerate>=0.21; diffusers needs >=0.6,
    # and its LoRA loading code paths test >=0.13.1); checked with `pip check` on the pinned stack.
    'peft==0.18.1',
    'scipy>=1.10',
    # Parquet inputs of the data pipeline (CommonCatalog ships as parquet).
    'pyarrow>=14',
    # Bar chart of the license mix in the provenance report.
    'matplotlib>=3.7',
    # FID, KID and CLIP score (torchmetrics; InceptionV3 from torch-fidelity, weights read from a local file).
    'torchmetrics>=1.7,<1.8',
    'torch-fidelity==0.4.0',
    # The human preference study's local web app.
    'flask>=3.0,<4',
]

# The local app to try a model (python -m diffusion.inference.app). gradio 6.17.3 is the newest that co-installs with
# the pinned stack: 6.18 and later need huggingface-hub>=1.2, which transformers 4.57 refuses (<1.0). It adds about
# 85 MB (its web front end) and fastapi, starlette, uvicorn, gradio-client, orjson, python-multipart, typer and a few
# small packages; torch, mosaicml, transformers, diffusers, pydantic and pandas stay as pinned (checked with
# `pip check`). Optional: nothing else in the package imports it.
APP = ['gradio==6.17.3']

# The data pipeline's `--engine ray` (diffusion.pipeline.engines): Ray Data's map_batches / ActorPoolStrategy.
# ray[data] 2.60.0 is the newest on PyPI and co-installs with the pinned stack: installed into it, it added only
# msgpack and pandas, `pip check` found no broken requirement and torch 2.7.0 / mosaicml 0.32.1 did not move.
RAY = ['ray[data]==2.60.0']

extras_require = {
    'ray': RAY,
    'dev': [
        *RAY,
        'pytest>=8',
        'pytest-xdist>=3.5',
        'ruff>=0.6',
        'moto[server]>=5',
        'boto3',
        'tensorboard',
        # sklearn.datasets.load_sample_images: two real CC BY 2.0 photos for the pipeline tests.
        'scikit-learn',
        # Drives Debian's chromium (chromium-driver) in the human-study and app browser tests; no driver download.
        'selenium>=4,<5',
        *APP,
    ],
    'app': APP,
    'xformers': ['xformers==0.0.30'],
    # optimizer.name=adamw_8bit (CUDA only). 0.48.2 is pinned as the release checked to co-install with torch 2.7
    # (it needs torch>=2.3) without moving any other pin here; pip check is clean with it.
    'bnb': ['bitsandbytes==0.48.2'],
}

setup(
    name='diffusion',
    version='0.1.0',
    description='CommonCanvas: latent diffusion training on Creative-Commons data with Composer',
    packages=find_packages(include=['diffusion', 'diffusion.*']),
    package_data={'diffusion.evaluation': ['prompts/*.txt', 'human_eval_static/*.html']},
    python_requires='>=3.10',
    install_requires=install_requires,
    extras_require=extras_require,
)
