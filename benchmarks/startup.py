"""Where a tiny run's time before its first training step goes, beside a plain diffusers script on the same model.

Each phase runs in a fresh interpreter, as a user's run pays it:

- ``launcher``: ``import composer.cli.launcher`` (what ``composer -n 1`` imports before it starts train.py);
- ``train.py imports``: ``import diffusion.train`` (Composer, diffusers, transformers, the registries);
- ``config`` / ``model`` / ``dataloader`` / ``trainer`` / ``first step``: the same run built and stepped in one
  process as ``train.py`` does it (``load_config``, the model, the streaming dataloader with its shard checks, the
  Trainer, one batch and the run's checkpoint); Composer's CPU-name probe runs in the background from the import
  of Composer on, as ``train.py`` starts it;
- ``composer -n 1 train.py`` end to end for one batch (wall time to exit), and ``python train.py``, the same
  one-process run without the launcher (whose import of all of Composer a launched run otherwise pays twice);
- ``plain diffusers``: a script importing torch, diffusers and transformers, building the same tiny UNet, VAE and
  CLIP text encoder and taking one AdamW step on one batch of random images: the floor a user compares with.

    python benchmarks/startup.py                  # 256 synthetic 32px samples, tiny_sd_cpu.yaml
    python benchmarks/startup.py --repeats 3      # the median of three
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAML = os.path.join(REPO, 'yamls', 'tiny_sd_cpu.yaml')

PHASED_RUN = r"""
import json, sys, time
t0 = time.perf_counter()
from diffusion.utils import start_composer_env_probe
start_composer_env_probe()  # as train.py does
from diffusion import builders
from diffusion.config import load_config
marks = {'imports': time.perf_counter()}
cfg = load_config(sys.argv[1], sys.argv[2:])
marks['config'] = time.perf_counter()
original_model, original_dataloader = builders.build_model, builders.build_dataloader
def build_model(*args, **kwargs):
    model = original_model(*args, **kwargs)
    marks['model'] = time.perf_counter()
    return model
def build_dataloader(*args, **kwargs):
    loader = original_dataloader(*args, **kwargs)
    marks.setdefault('dataloader', time.perf_counter())
    return loader
builders.build_model, builders.build_dataloader = build_model, build_dataloader
trainer = builders.build_trainer(cfg)
marks['trainer'] = time.perf_counter()
trainer.fit()
marks['first step'] = time.perf_counter()
names, last, out = list(marks), t0, {}
for name in names:
    out[name], last = marks[name] - last, marks[name]
print(json.dumps(out))
"""

PLAIN_DIFFUSERS = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
t1 = time.perf_counter()
torch.manual_seed(0)
configs = json.loads(sys.argv[1])  # the tiny model's configs, as the project builds it
unet = UNet2DConditionModel(**configs['unet'])
vae = AutoencoderKL(**configs['vae'])
text = CLIPTextModel(CLIPTextConfig(**configs['text_encoder']))
scheduler = DDPMScheduler()
optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
t2 = time.perf_counter()
images = torch.rand(16, 3, 32, 32) * 2 - 1
ids = torch.randint(0, text.config.vocab_size, (16, 77))
with torch.no_grad():
    latents = vae.encode(images).latent_dist.sample()
    context = text(ids)[0]
noise = torch.randn_like(latents)
t = torch.randint(0, 1000, (16,))
loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(latents, noise, t), t, context).sample, noise)
loss.backward()
optimizer.step()
t3 = time.perf_counter()
print(json.dumps({'imports': t1 - t0, 'model': t2 - t1, 'first step': t3 - t2}))
"""


def _timed(command: list[str], **kwargs) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True, **kwargs)
    return time.perf_counter() - start, result.stdout


def measure(data: str, work: str) -> dict[str, float]:
    python, env = sys.executable, {**os.environ, 'PYTHONPATH': REPO}
    overrides = [f'train_dataloader.remote={data}', 'progress_bar=false', 'max_duration=1ba', 'save_interval=100ba']
    row: dict[str, float] = {}
    row['launcher import'], _ = _timed([python, '-c', 'import composer.cli.launcher'], env=env)
    row['train.py imports'], _ = _timed([python, '-c', 'import diffusion.train'], env=env)
    run = os.path.join(work, f'phased_{time.time_ns()}')
    _, out = _timed([python, '-c', PHASED_RUN, YAML, f'run_folder={run}', *overrides], env=env, cwd=REPO)
    phases = json.loads(out.strip().splitlines()[-1])
    row.update({f'in-process {name}': seconds for name, seconds in phases.items()})
    run = os.path.join(work, f'launched_{time.time_ns()}')
    launched = [python, '-m', 'composer.cli.launcher', '-n', '1', 'train.py', YAML, f'run_folder={run}', *overrides]
    row['composer -n 1 train.py (1 batch, to exit)'], _ = _timed(launched, env=env, cwd=REPO)
    run = os.path.join(work, f'direct_{time.time_ns()}')
    direct = [python, 'train.py', YAML, f'run_folder={run}', *overrides]
    row['python train.py (1 batch, to exit)'], _ = _timed(direct, env=env, cwd=REPO)
    from diffusion.models import factories

    configs = {
        'unet': factories.TINY_UNET_CONFIG,
        'vae': factories.TINY_VAE_CONFIG,
        'text_encoder': factories.TINY_TEXT_ENCODER_CONFIG,
    }
    total, out = _timed([python, '-c', PLAIN_DIFFUSERS, json.dumps(configs)])
    plain = json.loads(out.strip().splitlines()[-1])
    row.update({f'plain diffusers {name}': seconds for name, seconds in plain.items()})
    row['plain diffusers (to exit)'] = total
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=1)
    parser.add_argument('--samples', type=int, default=256)
    args = parser.parse_args()
    from diffusion.data.synthetic import write_synthetic_dataset

    with tempfile.TemporaryDirectory() as work:
        data = write_synthetic_dataset(
            os.path.join(work, 'data'), num_samples=args.samples, image_size=32, progress=False, overwrite=True
        )
        rows = [measure(data, work) for _ in range(args.repeats)]
    print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, median of {args.repeats}:')
    for name in rows[0]:
        print(f'  {name:48s} {statistics.median(r[name] for r in rows):6.2f} s')


if __name__ == '__main__':
    main()
