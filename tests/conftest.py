"""Shared fixtures: one factory of tiny models, a generated image-caption dataset, and hygiene."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import urllib.request
from typing import Iterator

import catalogue
import numpy as np
import pytest
import torch

import diffusion.registry  # noqa: F401  (every built-in entry registered before restore_registries copies them)
from diffusion.config import load_config
from diffusion.data.synthetic import write_synthetic_dataset
from diffusion.models import tiny_stable_diffusion, tiny_stable_diffusion_xl
from diffusion.models.lora import LoRA

# Tests build every model from configs or local folders: any attempt to reach a model hub is a bug.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine running two test workers the
# threads spin against each other: one thread per worker samples and trains tiny models many times faster.
torch.set_num_threads(1)
# The same for the runs tests start as processes (`composer -n 2 train.py`, the pipeline's ranks): torch would give
# each of them as many threads as the machine has cores, so two ranks under two test workers ran eight threads on two
# cores. With one each, the four longest resume tests took 126 to 164 s instead of 193 to 279 s.
os.environ.setdefault('OMP_NUM_THREADS', '1')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO_ROOT, 'yamls', 'tiny_sd_cpu.yaml')
# Composer's launcher through this interpreter, so that it works wherever the stack is installed (a venv, or a
# ``pip install --target`` folder on PYTHONPATH as on the lent GPU machine), not only next to sys.executable.
COMPOSER_LAUNCHER = [sys.executable, '-m', 'composer.cli.launcher']


def master_port() -> int:
    """A free TCP port below the kernel's ephemeral range, for a launched job's rendezvous (``MASTER_PORT``).

    Composer's launcher otherwise asks the kernel for a free ephemeral port, closes it and lets rank 0 bind it later;
    in between, any process on the node (another test worker's gloo connections, a moto server) can be handed the same
    port, and rank 0 then fails to bind. Ports below the ephemeral range are never handed out that way.
    """
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()  # not the seeded global generator: two workers must not draw the same ports
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(('127.0.0.1', port))
            except OSError:
                continue
        return port
    raise RuntimeError('no free port below the ephemeral range')


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment with the repo root put first on PYTHONPATH (keeping what was there), a rendezvous port of its
    own (see :func:`master_port`) and ``extra`` set."""
    path = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get('PYTHONPATH')]))
    return {**os.environ, 'PYTHONPATH': path, 'MASTER_PORT': str(master_port()), **extra}


# Smaller than the demo's tiny model: the fastest size that still exercises every code path.
TEST_UNET = dict(
    block_out_channels=(8, 16),
    norm_num_groups=4,
    cross_attention_dim=16,
    attention_head_dim=4,
    sample_size=8,
)
TEST_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=('DownEncoderBlock2D',) * 2,
    up_block_types=('UpDecoderBlock2D',) * 2,
    norm_num_groups=4,
    sample_size=16,
)
TEST_TEXT_ENCODER = dict(
    hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, projection_dim=16
)
# The same sizes as config overrides, for yaml-driven runs.
TEST_MODEL_OVERRIDES = [
    'model.name=tiny_stable_diffusion',
    '+model.unet_config={block_out_channels:[8,16],norm_num_groups:4,cross_attention_dim:16,attention_head_dim:4,'
    'sample_size:8}',
    '+model.vae_config={block_out_channels:[8,16],down_block_types:[DownEncoderBlock2D,DownEncoderBlock2D],'
    'up_block_types:[UpDecoderBlock2D,UpDecoderBlock2D],norm_num_groups:4,sample_size:16}',
    '+model.text_encoder_config={hidden_size:16,intermediate_size:32,num_attention_heads:2,num_hidden_layers:1,'
    'projection_dim:16}',
]


# The SDXL classes at test size: 16px images, contexts 16 + 16 = 32 wide, pooled 16 + 6 x 8 time-id features.
TEST_XL = dict(
    unet_config=dict(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=32,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    ),
    vae_config=TEST_VAE,
    text_encoder_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2),
    text_encoder_2_config=dict(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, projection_dim=16
    ),
)
TINY_XL_YAML = os.path.join(REPO_ROOT, 'yamls', 'tiny_sdxl_cpu.yaml')
TEST_XL_MODEL_OVERRIDES = [
    'model.name=tiny_stable_diffusion_xl',
    '+model.unet_config={block_out_channels:[8,16],norm_num_groups:4,attention_head_dim:4,cross_attention_dim:32,'
    'addition_time_embed_dim:8,projection_class_embeddings_input_dim:64}',
    TEST_MODEL_OVERRIDES[2],  # the test VAE
    '+model.text_encoder_config={hidden_size:16,intermediate_size:32,num_attention_heads:2,num_hidden_layers:2}',
    '+model.text_encoder_2_config={hidden_size:16,intermediate_size:32,num_attention_heads:2,num_hidden_layers:2,'
    'projection_dim:16}',
]


# A scheduled-EMA run whose average clearly differs from the raw weights: EMA from batch 2, large steps.
EMA_TEST_OVERRIDES = (
    '+algorithms.ema={half_life: 2ba, ema_start: 2ba}',
    'train_dataloader.batch_size=16',
    'optimizer.lr=1e-2',
)


def max_abs_diff(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """The largest ``|got[k] - expected[k]|`` over ``expected``'s keys (compared on the CPU)."""
    return max(float((got[k].cpu() - v.cpu()).abs().max()) for k, v in expected.items())


def tiny_config(data: str, run_folder: str, *overrides: str):
    """yamls/tiny_sd_cpu.yaml at test size on ``data`` (16px), writing to ``run_folder``."""
    return load_config(
        TINY_YAML,
        [
            *TEST_MODEL_OVERRIDES,
            f'train_dataloader.remote={data}',
            'train_dataloader.resolution=16',
            f'run_folder={run_folder}',
            'progress_bar=false',
            *overrides,
        ],
    )


def run_script(script: str, *args: str, processes: int = 1, launcher: bool = True) -> str:
    """``composer -n <processes> <script> <args>`` from the repo root (``python <script> <args>`` for one process
    without the launcher, as ``make demo`` runs train.py); asserts success, returns stdout."""
    if not launcher and processes != 1:
        raise ValueError('only a one-process run starts without the launcher')
    command = [*COMPOSER_LAUNCHER, '-n', str(processes), script, *args] if launcher else [sys.executable, script, *args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def run_composer(yaml: str, *overrides: str, processes: int = 1, launcher: bool = True) -> str:
    """``composer -n <processes> train.py <yaml> <overrides>``: a training run as users launch it (``launcher=False``:
    ``python train.py``, the one-process start ``make demo`` uses)."""
    return run_script('train.py', yaml, *overrides, processes=processes, launcher=launcher)


def build_tiny_sd(**overrides):
    """A StableDiffusion of test size (16px images, 8x8 latents); ``overrides`` go to the factory."""
    return tiny_stable_diffusion(
        unet_config={**TEST_UNET, **overrides.pop('unet_config', {})},
        vae_config={**TEST_VAE, **overrides.pop('vae_config', {})},
        text_encoder_config={**TEST_TEXT_ENCODER, **overrides.pop('text_encoder_config', {})},
        **overrides,
    )


def build_tiny_sdxl(**overrides):
    """An SDXL model of test size (16px images, 8x8 latents); ``overrides`` go to the factory."""
    return tiny_stable_diffusion_xl(**TEST_XL, **overrides)


def build_adapted(build, seed: int = 0, **lora):
    """``build()`` after ``torch.manual_seed(seed)``, with a LoRA of rank 2 and alpha 4 (``lora`` goes to
    :class:`LoRA`, e.g. ``text_encoder=True``) whose B matrices are random, as a trained adapter's are (B starts at
    zero, which would hide a wrong export or load); in eval mode, its adapter the one in ``model.adapters``."""
    torch.manual_seed(seed)
    model = build()
    adapter = LoRA(rank=2, alpha=4, **lora)
    adapter.apply(model)
    model.adapters.append(adapter)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'lora_B' in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.fixture
def tiny_sd():
    return build_tiny_sd()


@pytest.fixture(scope='session')
def synthetic_dataset(tmp_path_factory) -> str:
    """128 synthetic image-caption samples at 32px as local MDS shards."""
    out = str(tmp_path_factory.mktemp('synthetic') / 'train')
    write_synthetic_dataset(out, num_samples=128, seed=0, image_size=32, progress=False)
    return out


@pytest.fixture(scope='session', autouse=True)
def checkpoint_key(tmp_path_factory) -> str:
    """The checkpoint signing key of this test session: a file under the session's temporary folder.

    Checkpoints are signed with a key kept outside every run folder, by default in the user's config folder
    (:mod:`diffusion.checkpointing`); tests never read nor create that one. The variables are set in this process's
    environment, so the ``composer`` runs the tests launch (:func:`subprocess_env`) sign and verify with the same key.
    """
    from diffusion.checkpointing import KEY_ENV, KEY_FILE_ENV

    folder = tmp_path_factory.mktemp('checkpoint_key')
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(KEY_ENV, raising=False)
        patch.setenv(KEY_FILE_ENV, str(folder / 'checkpoint.key'))
        patch.setenv('XDG_CONFIG_HOME', str(folder / 'config'))  # the default key file, should anything fall back
        yield str(folder / 'checkpoint.key')


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def restore_registries(monkeypatch):
    """Entries a test registers (or loads from an entry point) are gone after it: catalogue keeps every registry's
    entries in one module-level dict, replaced by a copy for the test's duration.

    The built-in entries are registered when ``diffusion.registry`` is first imported, which this module does at
    collection: a first import inside a test would register them into the copy only, and every later test in the
    worker would find the registries empty.
    """
    monkeypatch.setattr(catalogue, 'REGISTRY', dict(catalogue.REGISTRY))


@pytest.fixture(autouse=True)
def release_streaming_shared_memory(monkeypatch):
    """Free each test's streaming shared memory when the test ends, not at interpreter exit.

    streaming 0.13 registers every ``SharedMemory`` it opens with ``atexit``, which keeps the objects, and their
    file descriptors, alive for the life of the process. Training opens a dataset or two per process, but a test
    worker opens hundreds and would reach the open-file limit.
    """
    import atexit

    cleanups = []
    register = atexit.register

    def record(function, *args, **kwargs):
        owner = getattr(function, '__self__', None)
        if type(owner).__module__ == 'streaming.base.shared.memory' and function.__name__ == 'cleanup':
            cleanups.append(function)
            return function
        return register(function, *args, **kwargs)

    monkeypatch.setattr(atexit, 'register', record)
    yield
    for cleanup in cleanups:
        cleanup()


@contextlib.contextmanager
def moto_s3(patch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3 API (moto's server mode) on 127.0.0.1 with a bucket ``test-bucket``, its endpoint and test
    credentials set in the environment through ``patch``; yields the endpoint URL and stops the server after."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=port, verbose=False)
    server.start()
    endpoint = f'http://127.0.0.1:{port}'
    # moto keeps its buckets in process-wide state that outlives a server: start each test from an empty store, or
    # objects of an earlier test in this worker (a checkpoint under runs/a/) show up in this one.
    urllib.request.urlopen(urllib.request.Request(f'{endpoint}/moto-api/reset', method='POST')).close()
    for key, value in {
        'AWS_ACCESS_KEY_ID': 'testing',
        'AWS_SECRET_ACCESS_KEY': 'testing',
        'AWS_DEFAULT_REGION': 'us-east-1',
        'S3_ENDPOINT_URL': endpoint,
    }.items():
        patch.setenv(key, value)
    boto3.client('s3', endpoint_url=endpoint).create_bucket(Bucket='test-bucket')
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3 API (moto's server mode) on 127.0.0.1 with a bucket ``test-bucket``; yields the endpoint URL."""
    with moto_s3(monkeypatch) as endpoint:
        yield endpoint


@pytest.fixture(scope='module')
def module_s3_server():
    """``s3_server`` for a whole test module: one server, its variables set from the module's first test to its
    last (a Ray cluster started after it gives every worker the same environment)."""
    with pytest.MonkeyPatch.context() as patch, moto_s3(patch) as endpoint:
        yield endpoint
