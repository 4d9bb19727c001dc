"""FSDP through the parallelism config: the markers Composer reads, the CPU fallback to DDP, FSDP2 on CPU, and (on
a GPU) Composer FSDP with scheduled EMA."""

import os
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from diffusion.builders import build_trainer
from diffusion.callbacks.ema_weights import find_ema
from diffusion.parallelism import (
    CPU_FSDP_MESSAGE,
    clean_parameter_name,
    full_parameters,
    mark_fsdp_units,
    resolve_parallelism,
)
from tests.conftest import (
    EMA_TEST_OVERRIDES,
    REPO_ROOT,
    TEST_MODEL_OVERRIDES,
    TINY_YAML,
    build_tiny_sd,
    max_abs_diff,
    run_composer,
    run_script,
    tiny_config,
)


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
        'device=cpu',  # the fallback under test, also on a machine with GPUs
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
    with pytest.raises(ValueError, match=r'Unknown key parallelism_config.fdsp. Valid keys: fsdp, tp\.'):
        resolve_parallelism({'fdsp': {}}, 'gpu', build_tiny_sd())


def test_an_fsdp2_section_that_composer_would_ignore_is_refused(monkeypatch):
    # Composer's Trainer reads only `fsdp` (FSDP2 when FSDP_VERSION=2) and `tp`: `fsdp2` would train unsharded.
    with pytest.raises(ValueError, match=r'parallelism_config.fsdp2 is ignored .* set the environment variable'):
        resolve_parallelism({'fsdp2': {}}, 'gpu', build_tiny_sd())
    monkeypatch.setenv('FSDP_VERSION', '2')
    config = {'fsdp': {'reshard_after_forward': False}}  # an FSDP2 key, refused for FSDP
    assert resolve_parallelism(config, 'cpu', build_tiny_sd()) == config  # FSDP2 shards on CPU: kept
    monkeypatch.delenv('FSDP_VERSION')
    with pytest.raises(ValueError, match=r'Unknown key parallelism_config.fsdp.reshard_after_forward'):
        resolve_parallelism(config, 'gpu', build_tiny_sd())


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_two_process_cpu_run_with_fsdp2_shards_and_scheduled_ema_resumes_bit_exactly(synthetic_dataset, tmp_path):
    worker = os.path.join(REPO_ROOT, 'tests', 'fsdp2_run_worker.py')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('FSDP_VERSION', '2')
        stdout = run_script(worker, synthetic_dataset, str(tmp_path), processes=2)
    match = re.search(r'sharded=(\w+) weights=(\S+) ema=(\S+) gap=(\S+) export=(\S+)', stdout)
    assert match, stdout[-2000:]
    assert match.group(1) == 'True'  # the UNet's parameters are DTensors: FSDP2 sharded it
    weights, ema, gap, export = map(float, match.groups()[1:])
    # Before ShardedEMA saved its FSDP2 averages whole, the resumed run diverged (by 0.76 on the weights): a full
    # checkpoint gave every rank rank 0's shards of the average, and the swap at resume put them in the model.
    assert weights == 0 and ema == 0
    assert gap > 1e-3  # the average is not the raw weights...
    assert export == 0  # ...and it is what save_pretrained writes


@pytest.mark.slow
def test_the_multi_node_sd2_yaml_builds_and_trains_at_test_size(synthetic_dataset, tmp_path):
    """yamls/sd2_base_fsdp.yaml as written, but with the test-size model, local latents and CPU precision."""
    from diffusion.config import load_config
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
    if torch.cuda.is_available():  # the yaml's HYBRID_SHARD FSDP for real, on one GPU
        trainer = build_trainer(cfg)
        assert isinstance(trainer.state.model.unet, FSDP)
    else:
        with pytest.warns(UserWarning, match='Composer runs FSDP on CUDA GPUs only'):
            trainer = build_trainer(cfg)
    names = {type(a).__name__ for a in trainer.state.algorithms}
    assert {'ShardedEMA', 'LowPrecisionGroupNorm', 'AttentionBackend', 'ChannelsLast'} <= names
    trainer.fit()
    assert os.path.exists(tmp_path / 'checkpoints' / 'ep0-ba3-rank0.pt')
    assert os.path.exists(tmp_path / 'run' / 'pretrained' / 'unet' / 'diffusion_pytorch_model.safetensors')
    assert os.path.exists(tmp_path / 'run' / 'samples' / 'batch_0000002.png')


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason='Composer runs FSDP on CUDA GPUs only; CPU falls back above')
def test_on_a_gpu_composer_shards_the_unet_and_scheduled_ema_exports_and_resumes(synthetic_dataset, tmp_path):
    if torch.distributed.is_initialized() and torch.distributed.get_backend() != 'nccl':
        pytest.skip('an earlier test set up gloo in this process; run the GPU tests alone: pytest -m gpu')
    fsdp = (
        '+parallelism_config={fsdp: {sharding_strategy: FULL_SHARD, mixed_precision: DEFAULT, '
        'activation_checkpointing: true, state_dict_type: full, use_orig_params: true}}'
    )
    common = (
        fsdp,
        *EMA_TEST_OVERRIDES,
        'precision=amp_bf16',
        '+callbacks.speed_monitor={window_size: 2}',
        'save_interval=3ba',
    )

    def fit(name: str, *overrides: str):
        trainer = build_trainer(tiny_config(synthetic_dataset, str(tmp_path / name), *common, *overrides))
        trainer.fit()
        return trainer

    export = f'+callbacks.save_pretrained={{folder: {tmp_path}/export, components: [unet]}}'
    full = fit('full', 'max_duration=6ba', 'save_folder=null', export)  # no checkpoint: the raw weights stay in
    model = full.state.model
    assert isinstance(model.unet, FSDP) and not isinstance(model.vae, FSDP) and not isinstance(model.text_encoder, FSDP)
    inner = model.unet.module
    units = [module for module in model.unet.modules() if isinstance(module, FSDP)]
    assert len(units) == 1 + len(inner.down_blocks) + 1 + len(inner.up_blocks)  # the root and one per block
    assert any(isinstance(module, CheckpointWrapper) for module in model.unet.modules())
    log = (tmp_path / 'full' / 'log.txt').read_text()
    assert 'loss/train/total' in log and 'throughput/samples_per_sec' in log
    if any(card in torch.cuda.get_device_name().lower() for card in ('h100', 'h200', 'a100')):
        assert 'throughput/device/mfu' in log  # SpeedMonitor's MFU from the model's flops_per_batch

    ema = find_ema(full.state)
    assert ema.ema_started and not ema.ema_weights_active
    averaged = {k: v.detach().cpu() for k, v in ema.ema_model.named_parameters_dict.items()}
    assert averaged and all(clean_parameter_name(k) == k for k in averaged)
    with full_parameters(model):
        trained = {f'unet.{clean_parameter_name(k)}': v.detach().cpu() for k, v in model.unet.named_parameters()}
    gap = max_abs_diff(averaged, trained)
    assert gap > 1e-3  # the average is not the raw weights
    exported = UNet2DConditionModel.from_pretrained(str(tmp_path / 'export' / 'unet')).state_dict()
    for name, value in exported.items():
        if f'unet.{name}' in averaged:
            assert torch.equal(value, averaged[f'unet.{name}']), name

    fit('part', 'max_duration=3ba')
    checkpoint = tmp_path / 'part' / 'checkpoints' / 'ep0-ba3-rank0.pt'
    # Neither full nor resumed saves at its end: a checkpoint swaps the average into the model (Composer's EMA).
    resumed = fit('resumed', 'max_duration=6ba', 'save_folder=null', f'load_path={checkpoint}', 'load_trusted=true')
    resumed_ema = find_ema(resumed.state)
    assert resumed_ema.ema_started and not resumed_ema.ema_weights_active
    resumed_average = resumed_ema.ema_model.named_parameters_dict
    drift = max_abs_diff(resumed_average, averaged)
    # GPU kernels need not be bitwise reproducible, so the resumed average is held to a twentieth of the gap.
    assert drift <= 0.05 * gap, (drift, gap)
