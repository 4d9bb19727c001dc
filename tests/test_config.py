import glob
import os

import pytest
from omegaconf import OmegaConf

from diffusion import registry
from diffusion.builders import build_trainer, check_sections
from diffusion.config import load_config, validate_config
from tests.conftest import REPO_ROOT

YAMLS = sorted(glob.glob(os.path.join(REPO_ROOT, 'yamls', '*.yaml')))


def minimal(**extra):
    cfg = {
        'model': {'name': 'tiny_stable_diffusion'},
        'train_dataloader': {'name': 'image_caption', 'remote': 'x', 'batch_size': 2},
        'max_duration': '1ba',
    }
    cfg.update(extra)
    return cfg


def test_misspelled_top_level_key_is_named():
    with pytest.raises(ValueError, match="'max_duraton'.*Valid top-level keys: model, train_dataloader"):
        validate_config(minimal(max_duraton='1ba'))


def test_wrong_type_is_named():
    with pytest.raises(ValueError, match="'seed'"):
        validate_config(minimal(seed='abc'))


def test_autoresume_without_overwrite_is_refused():
    with pytest.raises(ValueError, match='autoresume needs save_overwrite: true'):
        validate_config(minimal(autoresume=True, save_folder='checkpoints', save_overwrite=False))


def test_missing_required_key_is_named():
    cfg = minimal()
    del cfg['max_duration']
    with pytest.raises(ValueError, match='max_duration'):
        validate_config(cfg)


@pytest.mark.parametrize(
    'section, value, message',
    [
        ('model', {'name': 'tiny_stable_diffusion', 'caption_drop_prb': 0.1}, 'Unknown key model.caption_drop_prb'),
        ('model', {'name': 'tiny_stable_difusion'}, "Unknown models name 'tiny_stable_difusion'. Valid names: "),
        (
            'train_dataloader',
            {'name': 'image_caption', 'batch_size': 2, 'resoltion': 8},
            'Unknown key train_dataloader.resoltion. Valid keys: remote, local, batch_size',
        ),
        ('optimizer', {'name': 'adamw', 'learning_rate': 1.0}, 'Unknown key optimizer.learning_rate'),
        ('algorithms', {'ema': {'half_lfe': '10ba'}}, 'Unknown key algorithms.ema.half_lfe'),
        ('callbacks', {'speed_monitr': {}}, "Unknown callbacks name 'speed_monitr'"),
        ('loggers', {'file': {'log_interval': 5}}, 'Unknown key loggers.file.log_interval'),
        (
            'train_dataloader',
            {'name': 'image_caption', 'batch_size': 2, 'tokenizer': 'x'},
            'train_dataloader.tokenizer is set by the trainer',
        ),
    ],
)
def test_bad_registry_sections_fail_before_building(section, value, message):
    cfg = validate_config(minimal(**{section: value}))
    with pytest.raises(ValueError, match=message):
        check_sections(cfg)
    with pytest.raises(ValueError, match=message):
        build_trainer(cfg)  # the same check runs first in the real build


def test_model_typo_caught_when_building_directly():
    # Keys a factory forwards to StableDiffusion are checked too, and the valid ones listed.
    with pytest.raises(
        ValueError, match='Unknown key models.tiny_stable_diffusion.min_snr_gama. Valid keys: .*min_snr_gamma'
    ):
        registry.models.build('tiny_stable_diffusion', {'min_snr_gama': 5.0})


def test_override_of_unknown_key_fails_with_its_name():
    with pytest.raises(Exception, match='max_duraton'):
        load_config(os.path.join(REPO_ROOT, 'yamls', 'demo.yaml'), ['max_duraton=5ba'])


def test_overrides_apply_and_interpolations_resolve():
    cfg = load_config(os.path.join(REPO_ROOT, 'yamls', 'demo.yaml'), ['max_duration=5ba', 'run_name=x'])
    assert cfg.max_duration == '5ba'
    assert cfg.run_folder == 'runs/x'
    assert cfg.save_folder == 'runs/x/checkpoints'


def test_registries_are_seeded_with_composer_components():
    for name in ('ema', 'low_precision_groupnorm', 'low_precision_layernorm', 'channels_last', 'gradient_clipping'):
        assert name in registry.algorithms
    for name in ('speed_monitor', 'nan_monitor', 'lr_monitor', 'log_diffusion_images', 'prompt_following'):
        assert name in registry.callbacks
    assert {'file', 'tensorboard'} <= set(registry.loggers.names())


@pytest.mark.parametrize('path', YAMLS, ids=[os.path.basename(p) for p in YAMLS])
def test_every_yaml_validates(path):
    cfg = load_config(path)
    check_sections(cfg)
    assert OmegaConf.select(cfg, 'model.name') in registry.models
