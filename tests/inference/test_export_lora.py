"""LoRA exports: diffusers' LoRA file, the kohya / ComfyUI file and the fused pipeline, each loaded by plain
diffusers in a fresh process (no ``diffusion`` import), give the images the project's own ``generate`` gives."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from safetensors import safe_open

from diffusion.inference.export import LORA_WEIGHTS, export_lora, export_model
from tests.conftest import build_adapted, build_tiny_sd, build_tiny_sdxl

PROMPTS = ['a red circle', 'a blue square']

# Plain diffusers: the base pipeline, plus the LoRA file (or the kohya file), or the fused pipeline alone.
DIFFUSERS_ONLY = """
import sys
import torch
from diffusers import DiffusionPipeline

assert 'diffusion' not in sys.modules
base, lora_dir, weight_name, fused, out = sys.argv[1:]
images = {{}}
for name, weights in (('diffusers', '{lora}'), ('kohya', weight_name)):
    pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(lora_dir, weight_name=weights)
    pipe.set_progress_bar_config(disable=True)
    images[name] = pipe({prompts}, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                        output_type='pt', guidance_scale=7.5).images
pipe = DiffusionPipeline.from_pretrained(fused, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
images['fused'] = pipe({prompts}, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                       output_type='pt', guidance_scale=7.5).images
assert 'diffusion' not in sys.modules
torch.save(images, out)
"""


def plain_diffusers(tmp_path, base, lora_dir, kohya_name, fused) -> dict[str, torch.Tensor]:
    script = tmp_path / 'plain.py'
    script.write_text(DIFFUSERS_ONLY.format(lora=LORA_WEIGHTS, prompts=PROMPTS))
    out = tmp_path / 'theirs.pt'
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # the project is not importable there
    result = subprocess.run(
        [sys.executable, str(script), base, lora_dir, kohya_name, fused, str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize(
    'build, text_encoder',
    [(build_tiny_sd, False), (build_tiny_sd, True), (build_tiny_sdxl, True)],
    ids=['sd2_unet', 'sd2_unet_and_text_encoder', 'sdxl_unet_and_text_encoders'],
)
def test_lora_exports_load_in_plain_diffusers_and_sample_the_models_images(build, text_encoder, tmp_path):
    torch.manual_seed(0)
    base = build().eval()
    model = build_adapted(build, text_encoder=text_encoder)  # a trained-looking adapter: random B matrices
    [adapter] = model.adapters
    ours = model.generate(PROMPTS, num_inference_steps=3, seed=0)
    assert not torch.allclose(ours, base.generate(PROMPTS, num_inference_steps=3, seed=0), atol=1e-3)

    export_model(base, str(tmp_path / 'base'), model_card=False)
    written = export_lora(model, str(tmp_path / 'lora'))
    export_model(model, str(tmp_path / 'fused'), model_card=False)
    assert model.adapters == [adapter]  # exports leave the model as it was

    with safe_open(written['kohya'], 'pt') as f:
        keys = set(f.keys())
        assert f.get_tensor(next(k for k in keys if k.endswith('.alpha'))).item() == 4.0
    assert keys and all(k.startswith(('lora_unet_', 'lora_te_', 'lora_te1_', 'lora_te2_')) for k in keys)
    assert any(k.endswith('.lora_down.weight') for k in keys) and any(k.endswith('.lora_up.weight') for k in keys)
    assert any(k.startswith('lora_te') for k in keys) == text_encoder
    card = open(written['model_card']).read()
    # The card names the base (its SHA-256 too) and states the training data's license mix (unknown here).
    from diffusion.models.lora import base_digest

    assert 'This folder holds a LoRA adapter' in card and base_digest(base) in card
    assert 'license' in card.lower()

    theirs = plain_diffusers(tmp_path, str(tmp_path / 'base'), str(tmp_path / 'lora'), 'lora_kohya.safetensors',
                             str(tmp_path / 'fused'))  # fmt: skip
    for kind in ('diffusers', 'kohya', 'fused'):
        torch.testing.assert_close(theirs[kind], ours, atol=1e-4, rtol=0, msg=kind)


# Plain diffusers with an SD3 base: the LoRA file through StableDiffusion3Pipeline.load_lora_weights.
SD3_DIFFUSERS_ONLY = """
import sys
import torch
from diffusers import StableDiffusion3Pipeline

assert 'diffusion' not in sys.modules
base, lora_dir, fused, out = sys.argv[1:]
images = {{}}
for name, folder in (('lora', base), ('fused', fused)):
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    if name == 'lora':
        pipe.load_lora_weights(lora_dir, weight_name='{lora}')
    pipe.set_progress_bar_config(disable=True)
    images[name] = pipe({prompts}, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                        output_type='pt', guidance_scale=3.0, height=16, width=16,
                        max_sequence_length=pipe.tokenizer_3.model_max_length).images
assert 'diffusion' not in sys.modules
torch.save(images, out)
"""


def test_an_mmdit_lora_loads_in_plain_diffusers_sd3_and_samples_the_models_images(tmp_path):
    from tests.models.test_mmdit import build_tiny_sd3

    torch.manual_seed(0)
    base = build_tiny_sd3(use_attention_mask=False).eval()  # diffusers' SD3 pipeline runs T5 unmasked
    model = build_adapted(partial(build_tiny_sd3, use_attention_mask=False))
    sampling = dict(num_inference_steps=3, seed=0, guidance_scale=3.0, height=16, width=16)
    ours = model.generate(PROMPTS, **sampling)
    assert not torch.allclose(ours, base.generate(PROMPTS, **sampling), atol=1e-3)

    # The kohya layout has no SD3 keys: refused in one line, before anything is written.
    with pytest.raises(ValueError, match=r"^kohya_file='lora_kohya.safetensors': .* is for SD1/SD2/SDXL UNet models"):
        export_lora(model, str(tmp_path / 'refused'))
    assert not (tmp_path / 'refused').exists()

    export_model(base, str(tmp_path / 'base'), model_card=False)
    written = export_lora(model, str(tmp_path / 'lora'), kohya_file=None)
    export_model(model, str(tmp_path / 'fused'), model_card=False)
    assert set(written) == {'lora', 'model_card'}
    with safe_open(written['lora'], 'pt') as f:
        keys = list(f.keys())
    # peft's names for every layer (the loader of SD3 skips diffusers' older lora.down / lora.up names).
    assert keys and all(k.startswith('transformer.') and k.endswith(('.lora_A.weight', '.lora_B.weight')) for k in keys)

    script = tmp_path / 'plain_sd3.py'
    script.write_text(SD3_DIFFUSERS_ONLY.format(lora=LORA_WEIGHTS, prompts=PROMPTS))
    out = tmp_path / 'theirs.pt'
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    folders = [str(tmp_path / name) for name in ('base', 'lora', 'fused')]
    result = subprocess.run([sys.executable, str(script), *folders, str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(out, weights_only=True)
    for kind in ('lora', 'fused'):
        torch.testing.assert_close(theirs[kind], ours, atol=1e-4, rtol=0, msg=kind)


def test_the_export_cli_writes_the_lora_files_the_kohya_file_and_the_fused_pipeline(synthetic_dataset, tmp_path):
    from diffusion.inference.export import main as export_cli
    from diffusion.inference.loading import load_checkpoint
    from diffusion.models.adapters import merge_adapters
    from tests.models.test_lora import lora_run

    trainer = lora_run(synthetic_dataset, str(tmp_path / 'run'), 'max_duration=1ba', 'save_interval=1ba')
    trainer.fit()
    checkpoint = str(tmp_path / 'run' / 'checkpoints' / 'ep0-ba1-rank0.pt')
    trained = {n: p.detach().clone() for n, p in trainer.state.model.named_parameters() if 'lora_' in n}

    written = export_cli(
        ['--checkpoint', checkpoint, '--out', str(tmp_path / 'lora'), '--lora', '--kohya', 'k.safetensors']
    )
    assert set(written) == {'lora', 'kohya', 'model_card'} and written['kohya'] == str(
        tmp_path / 'lora' / 'k.safetensors'
    )
    with safe_open(written['lora'], 'pt') as f:
        # One A and one B per adapted layer, under diffusers' UNet names, holding the trained values.
        assert len(list(f.keys())) == len(trained)
        up = {k: f.get_tensor(k) for k in f.keys() if k.endswith('lora.up.weight')}
    some_b = next(n for n in trained if 'lora_B' in n)
    stem = some_b.split('.lora_B', 1)[0]
    assert torch.equal(up[f'{stem}.lora.up.weight'], trained[some_b])
    with safe_open(written['kohya'], 'pt') as f:
        assert sum(k.endswith('.lora_up.weight') for k in f.keys()) == len(trained) // 2

    fused = export_cli(['--checkpoint', checkpoint, '--out', str(tmp_path / 'fused'), '--fused'])
    merged = merge_adapters(load_checkpoint(checkpoint).model)
    reloaded = load_checkpoint(fused['pipeline']).model
    assert not reloaded.adapters and not any('lora_' in k for k in reloaded.state_dict())
    expected = merged.unet.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in reloaded.unet.state_dict().items())

    # A model without adapters: --fused and --lora are refused, naming the checkpoint.
    base = tmp_path / 'base'
    build_tiny_sd().pipeline().save_pretrained(base, safe_serialization=True)
    with pytest.raises(SystemExit, match=rf'--fused: {base} has no adapters to merge'):
        export_cli(['--checkpoint', str(base), '--out', str(tmp_path / 'x'), '--fused'])
    with pytest.raises(SystemExit, match=rf'--lora: {base} needs one lora adapter .* it has none'):
        export_cli(['--checkpoint', str(base), '--out', str(tmp_path / 'y'), '--lora'])
    assert not any((tmp_path / 'x').iterdir()) and not any((tmp_path / 'y').iterdir())  # nothing written
    with pytest.raises(SystemExit):  # argparse: --kohya needs --lora
        export_cli(['--checkpoint', checkpoint, '--out', str(tmp_path / 'z'), '--kohya', 'k.safetensors'])
