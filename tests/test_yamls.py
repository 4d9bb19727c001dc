"""Every yaml in yamls/ builds a Trainer (nothing is trained), and bad settings fail in one line naming the key."""

import glob
import os

import pytest
import torch

from diffusion.builders import build_trainer
from diffusion.config import load_config
from tests.conftest import REPO_ROOT, TEST_MODEL_OVERRIDES, TEST_XL_MODEL_OVERRIDES, TINY_YAML, tiny_config
from tests.pipeline.test_precompute_t5 import MMDIT_OVERRIDES

YAMLS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO_ROOT, 'yamls', '*.yaml')))
TEST_VAE = ('+model.vae_config={block_out_channels:[8,16],down_block_types:[DownEncoderBlock2D,DownEncoderBlock2D],'
            'up_block_types:[UpDecoderBlock2D,UpDecoderBlock2D],norm_num_groups:4,sample_size:16}')  # fmt: skip
# What each yaml needs to build here: test-size models, the test data, no hub downloads, CPU precision.
SUBSTITUTES = {
    'demo_autoencoder.yaml': [TEST_VAE],
    'demo.yaml': [
        *TEST_MODEL_OVERRIDES,
        '~model.pretrained_model_name_or_path',
        '~model.pretrained_components',
        'eval_dataloader.remote={data}',
    ],
    'tiny_sd_cpu.yaml': TEST_MODEL_OVERRIDES,
    'tiny_sd_latents_cpu.yaml': TEST_MODEL_OVERRIDES,
    'sd2_base_fsdp.yaml': [
        'model.name=tiny_stable_diffusion',
        *TEST_MODEL_OVERRIDES,
        '~model.pretrained_model_name_or_path',
        '~model.pretrained_components',
        '~train_dataloader.local',
        'train_dataloader.batch_size=4',
        'precision=fp32',
        'autoresume=false',
    ],
}
# The fine-tuning demo starts from an export of the demo model: here from the test model built from its config.
SUBSTITUTES['demo_finetune_lora.yaml'] = [
    *TEST_MODEL_OVERRIDES,
    '~model.pretrained_model_name_or_path',
    '~model.pretrained_components',
]
SUBSTITUTES['demo_finetune_full.yaml'] = SUBSTITUTES['demo_finetune_lora.yaml']
SUBSTITUTES['commoncanvas_s_c.yaml'] = SUBSTITUTES['sd2_base_fsdp.yaml']
SUBSTITUTES['commoncanvas_s_nc.yaml'] = SUBSTITUTES['commoncanvas_s_c.yaml']
SUBSTITUTES['sdxl_base_fsdp.yaml'] = [
    *TEST_XL_MODEL_OVERRIDES,
    '~model.pretrained_model_name_or_path',
    '~model.pretrained_components',
    '~train_dataloader.local',
    'train_dataloader.batch_size=4',
    'train_dataloader.aspect_buckets=[[16,16]]',
    'precision=fp32',
    'autoresume=false',
]
# The synthetic data mix NC licenses in, which the size scan of the buckets would read: the guard has its own test.
SUBSTITUTES['commoncanvas_xl_c.yaml'] = [*SUBSTITUTES['sdxl_base_fsdp.yaml'], '~train_dataloader.license_preset']
SUBSTITUTES['commoncanvas_xl_nc.yaml'] = SUBSTITUTES['commoncanvas_xl_c.yaml']
SUBSTITUTES['tiny_sdxl_cpu.yaml'] = [*TEST_XL_MODEL_OVERRIDES, 'train_dataloader.aspect_buckets=[[16,16],[16,24]]']
SUBSTITUTES['tiny_sdxl_latents_cpu.yaml'] = TEST_XL_MODEL_OVERRIDES
# The test VAE with 16 latent channels and a shift; 16px images are 8x8 latents, 4x4 MMDiT patches.
SUBSTITUTES['tiny_mmdit_cpu.yaml'] = [
    '+model.vae_config={block_out_channels:[8,16],down_block_types:[DownEncoderBlock2D,DownEncoderBlock2D],'
    'up_block_types:[UpDecoderBlock2D,UpDecoderBlock2D],norm_num_groups:4,sample_size:16,latent_channels:16,'
    'shift_factor:0.1}',
    'model.max_length=8',
]
SUBSTITUTES['sd3_medium_fsdp.yaml'] = [
    'model.name=tiny_stable_diffusion_3',
    *SUBSTITUTES['tiny_mmdit_cpu.yaml'],
    '~model.pretrained_model_name_or_path',
    '~model.pretrained_components',
    '~train_dataloader.local',
    'train_dataloader.batch_size=4',
    'precision=fp32',
    'autoresume=false',
]
# The synthetic data mix NC licenses in: the license guard has its own test.
SUBSTITUTES['commoncanvas_mmdit_c.yaml'] = [*SUBSTITUTES['sd3_medium_fsdp.yaml'], '~train_dataloader.license_preset']
SUBSTITUTES['commoncanvas_mmdit_nc.yaml'] = SUBSTITUTES['sd3_medium_fsdp.yaml']
# The demo autoencoder's 4 channels, unshifted, as the test VAE.
SUBSTITUTES['demo_mmdit.yaml'] = [
    TEST_VAE[:-1] + ',latent_channels:4}',
    'model.max_length=8',
    '~model.pretrained_model_name_or_path',
    '~model.pretrained_components',
    'eval_dataloader.remote={data}',
]
# The same model overrides as the precompute that writes its shards (tests/pipeline/test_precompute_t5.py).
SUBSTITUTES['tiny_mmdit_latents_cpu.yaml'] = MMDIT_OVERRIDES
# The fine-tuning yamls load every component from a pipeline folder: {pipeline} is a tiny one of the family, saved
# by the test (see FINETUNE_BASES), so the yaml's own model section builds, with the path swapped.
FINETUNE = ['model.pretrained_model_name_or_path={pipeline}', 'precision=fp32', 'train_dataloader.batch_size=4']
SUBSTITUTES['finetune_sd2_lora.yaml'] = FINETUNE
SUBSTITUTES['finetune_sd2_full.yaml'] = [*FINETUNE, 'device_train_microbatch_size=2']
SUBSTITUTES['finetune_sdxl_lora.yaml'] = FINETUNE
SUBSTITUTES['finetune_sd3_lora.yaml'] = FINETUNE
# fmt: skip


def finetune_base(name: str, folder: str):
    """A tiny model of the family a fine-tuning yaml names, saved as a diffusers pipeline folder (safetensors)."""
    from tests.conftest import build_tiny_sd, build_tiny_sdxl
    from tests.models.test_mmdit import build_tiny_sd3

    build = build_tiny_sdxl if 'sdxl' in name else build_tiny_sd3 if 'sd3' in name else build_tiny_sd
    model = build()
    model.pipeline().save_pretrained(folder, safe_serialization=True)
    return model


def test_every_yaml_has_build_substitutes():
    assert sorted(SUBSTITUTES) == YAMLS, 'add the new yaml to SUBSTITUTES so that it is built in the suite'


@pytest.mark.parametrize('name', YAMLS)
def test_every_yaml_builds_a_trainer(name, synthetic_dataset, tmp_path):
    import json

    path = os.path.join(REPO_ROOT, 'yamls', name)
    cfg = load_config(path)
    data = synthetic_dataset
    if cfg.train_dataloader.name == 'latents':
        from tests.models.test_sdxl_training import precompute_sdxl
        from tests.pipeline.test_precompute import precompute
        from tests.pipeline.test_precompute_t5 import precompute_mmdit

        data = str(tmp_path / 'latents')
        name_of = cfg.model.name
        writer = precompute_sdxl if 'sdxl' in name_of else precompute_mmdit if 'diffusion_3' in name_of else precompute
        writer(synthetic_dataset, data)
    overrides = [o.replace('{data}', data) for o in SUBSTITUTES[name]]
    if any('{pipeline}' in o for o in overrides):
        base = finetune_base(name, str(tmp_path / 'base'))
        overrides = [o.replace('{pipeline}', str(tmp_path / 'base')) for o in overrides]
    else:
        base = None
    overrides += [f'train_dataloader.remote={data}', f'run_folder={tmp_path}/run', 'save_folder=null']
    if 'resolution' in cfg.train_dataloader:
        overrides.append('train_dataloader.resolution=16')
    if cfg.eval_dataloader:
        overrides.append('eval_dataloader.resolution=16')
    if cfg.train_dataloader.get('num_workers'):
        overrides.append('train_dataloader.num_workers=0')
    trainer = build_trainer(load_config(path, overrides))
    assert trainer.state.max_duration == load_config(path).max_duration
    with open(tmp_path / 'run' / 'config.yaml') as f:
        assert f.read()  # the resolved config is saved with the run
    json.dumps(sorted(type(a).__name__ for a in trainer.state.algorithms))
    if base is not None:  # every weight of the denoiser is the folder's, under the adapter the yaml asks for
        from diffusion.models.lora import base_state_dict

        attribute = base.denoiser.attribute
        got = base_state_dict(getattr(trainer.state.model, attribute))
        expected = getattr(base, attribute).state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
        assert [a.name for a in trainer.state.model.adapters] == list(cfg.model.get('adapters') or {})


def test_a_missing_data_path_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'^train_dataloader: No MDS dataset at '):
        build_trainer(tiny_config(str(tmp_path / 'nowhere'), str(tmp_path)))


def test_a_batch_size_that_ranks_cannot_share_names_the_key(synthetic_dataset, tmp_path, monkeypatch):
    from composer.utils import dist

    monkeypatch.setattr(dist, 'get_world_size', lambda: 3)
    with pytest.raises(ValueError, match=r'^train_dataloader: batch_size 16 is not divisible by the number of ranks'):
        build_trainer(tiny_config(synthetic_dataset, str(tmp_path)))


def test_wrong_types_and_unknown_keys_name_the_key():
    with pytest.raises(ValueError, match="override seed=abc: Value 'abc' of type 'str' could not be converted to Int"):
        load_config(TINY_YAML, ['seed=abc'])
    with pytest.raises(ValueError, match="Unknown config key 'max_duraton'. Valid top-level keys: model, "):
        load_config(TINY_YAML, ['max_duraton=5ba'])
