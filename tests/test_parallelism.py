"""FSDP through the parallelism config: the markers Composer's FSDP reads, and the CPU fallback to DDP."""

import os

import pytest
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

from diffusion.parallelism import CPU_FSDP_MESSAGE, mark_fsdp_units, resolve_parallelism
from tests.conftest import REPO_ROOT, TEST_MODEL_OVERRIDES, TINY_YAML, build_tiny_sd, run_composer


def test_unet_blocks_are_fsdp_units_and_frozen_encoders_stay_out():
    model = build_tiny_sd()
    mark_fsdp_units(model)
    units = [m for m in model.unet.modules() if getattr(m, '_fsdp_wrap', False)]
    expected = [*model.unet.down_blocks, model.unet.mid_block, *model.unet.up_blocks]
    assert len(units) == len(expected) and {id(m) for m in units} == {id(m) for m in expected}
    assert model.vae._fsdp_wrap is False and model.text_encoder._fsdp_wrap is False
    checkpointed = [m for m in model.unet.modules() if model.unet.activation_checkpointing_fn(m)]
    assert checkpointed and all(isinstance(m, (BasicTransformerBlock, ResnetBlock2D)) for m in checkpointed)
    trained = build_tiny_sd(train_text_encoder=True)
    mark_fsdp_units(trained)
    assert trained.text_encoder._fsdp_wrap is True  # a text encoder that trains needs its gradients reduced


def test_fsdp_config_on_cpu_falls_back_with_a_message():
    model = build_tiny_sd()
    config = {'fsdp': {'sharding_strategy': 'FULL_SHARD', 'mixed_precision': 'PURE'}}
    with pytest.warns(UserWarning, match='Composer runs FSDP on CUDA GPUs only'):
        assert resolve_parallelism(config, 'cpu', model) is None
    assert not hasattr(model.unet.down_blocks[0], '_fsdp_wrap')
    assert resolve_parallelism(config, 'gpu', model) == config
    assert model.unet.down_blocks[0]._fsdp_wrap is True
    assert resolve_parallelism(None, 'cpu', model) is None


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_two_process_cpu_run_with_the_fsdp_config_trains_with_ddp(synthetic_dataset, tmp_path):
    stdout = run_composer(
        TINY_YAML,
        *TEST_MODEL_OVERRIDES,
        f'train_dataloader.remote={synthetic_dataset}',
        'train_dataloader.resolution=16',
        f'run_folder={tmp_path}',
        'max_duration=2ba',
        'save_folder=null',
        'progress_bar=false',
        '+parallelism_config={fsdp: {sharding_strategy: FULL_SHARD, activation_checkpointing: true}}',
        processes=2,
    )
    assert CPU_FSDP_MESSAGE in stdout
    with open(tmp_path / 'log.txt') as f:
        assert 'loss/train/total' in f.read()


def test_a_misspelled_fsdp_key_is_named_before_anything_is_built():
    # Composer's FSDPConfig would keep the typo silently and train without activation checkpointing.
    with pytest.raises(ValueError, match=r'Unknown key parallelism_config.fsdp.activation_checkpoiting. Valid keys: '):
        resolve_parallelism({'fsdp': {'activation_checkpoiting': True}}, 'cpu', build_tiny_sd())
    with pytest.raises(ValueError, match=r'Unknown key parallelism_config.fdsp. Valid keys: fsdp, tp, fsdp2'):
        resolve_parallelism({'fdsp': {}}, 'gpu', build_tiny_sd())


@pytest.mark.slow
def test_the_multi_node_sd2_yaml_builds_and_trains_at_test_size(synthetic_dataset, tmp_path):
    """yamls/sd2_base_fsdp.yaml as written, but with the test-size model, local latents and CPU precision."""
    from diffusion.config import load_config
    from diffusion.train import build_trainer
    from tests.pipeline.test_precompute import precompute

    latents = str(tmp_path / 'latents')
    precompute(synthetic_dataset, latents)
    yaml = os.path.join(REPO_ROOT, 'yamls', 'sd2_base_fsdp.yaml')
    cfg = load_config(
        yaml,
        [
            'model.name=tiny_stable_diffusion',
            '~model.pretrained_model_name_or_path',
            '~model.pretrained_components',
            *TEST_MODEL_OVERRIDES,
            f'train_dataloader.remote={latents}',
            '~train_dataloader.local',
            'train_dataloader.batch_size=4',
            'train_dataloader.num_workers=0',
            'device_train_microbatch_size=2',
            'precision=fp32',  # Composer trains bf16 on GPUs only
            'max_duration=3ba',
            'algorithms.ema.ema_start=1ba',
            'callbacks.log_diffusion_images.interval=2ba',
            'callbacks.log_diffusion_images.num_inference_steps=2',
            'save_interval=3ba',
            f'save_folder={tmp_path}/checkpoints',
            f'run_folder={tmp_path}/run',
        ],
    )
    with pytest.warns(UserWarning, match='Composer runs FSDP on CUDA GPUs only'):
        trainer = build_trainer(cfg)
    names = {type(a).__name__ for a in trainer.state.algorithms}
    assert {'ShardedEMA', 'LowPrecisionGroupNorm', 'AttentionBackend', 'ChannelsLast'} <= names
    trainer.fit()
    assert os.path.exists(tmp_path / 'checkpoints' / 'ep0-ba3-rank0.pt')
    assert os.path.exists(tmp_path / 'run' / 'pretrained' / 'unet' / 'diffusion_pytorch_model.safetensors')
    assert os.path.exists(tmp_path / 'run' / 'samples' / 'batch_0000002.png')
