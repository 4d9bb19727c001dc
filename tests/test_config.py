import glob
import os
import re

import pytest
from omegaconf import OmegaConf

from diffusion import registry
from diffusion.builders import build_trainer, check_sections
from diffusion.config import ConfigError, check_s3_credentials, load_config, validate_config
from diffusion.train import main
from tests.conftest import REPO_ROOT, TEST_MODEL_OVERRIDES, TINY_YAML

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


def nothing_is_built(*args, **kwargs):
    raise AssertionError('a check meant to run before anything is built let the build start')


# Issue 13 (item 8): values that failed deep inside a builder, or not at all, without naming their key.
@pytest.mark.parametrize(
    'override, message',
    [
        ('train_dataloader.batch_size=sixteen', "Invalid train_dataloader.batch_size='sixteen': expected an integer."),
        ('model.caption_drop_prob=lots', "Invalid model.caption_drop_prob='lots': expected a number."),
        ('save_interval=banana', "Invalid save_interval='banana': expected a Composer time string such as 10ba"),
        ('algorithms.ema.half_life=soon', "Invalid algorithms.ema.half_life='soon': expected a Composer time string"),
        ('optimizer.betas=[0.9]', 'Invalid optimizer.betas=[0.9]: expected a list of 2 values (a number, a number).'),
        ('train_dataloader.crop=[1]', 'Invalid train_dataloader.crop=[1]: expected a string.'),
    ],
)
def test_a_malformed_value_fails_in_one_line_naming_the_key_before_anything_is_built(
    override, message, monkeypatch, capsys, tmp_path
):
    monkeypatch.setattr('diffusion.builders.build_model', nothing_is_built)  # nothing may be built
    with pytest.raises(SystemExit) as exit_info:
        main([TINY_YAML, f'run_folder={tmp_path}', override])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count('\n') == 1 and error.startswith('error: ') and message in error, error


@pytest.mark.parametrize(
    'overrides, message',
    [
        # The yaml's own tiny model: a 3-level VAE, 4 pixels per latent side.
        (['train_dataloader.resolution=30'], 'Invalid train_dataloader.resolution=30: expected a multiple of 4, the '
         'VAE factor of tiny_stable_diffusion (its vae_scale_factor, pixels per latent side), e.g. 28 or 32.'),
        # The test-size model: a 2-level VAE.
        ([*TEST_MODEL_OVERRIDES, 'train_dataloader.resolution=16', 'eval_dataloader={name: image_caption, '
          'remote: x, batch_size: 2, resolution: 15}'], 'Invalid eval_dataloader.resolution=15: expected a multiple '
         'of 2'),
    ],
)  # fmt: skip
def test_a_resolution_that_is_not_a_multiple_of_the_vae_factor_is_refused_before_the_dataloaders(
    overrides, message, monkeypatch, tmp_path
):
    monkeypatch.setattr('diffusion.builders.build_dataloader', nothing_is_built)
    cfg = load_config(TINY_YAML, [f'run_folder={tmp_path}', *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_trainer(cfg)


def _no_aws_credentials(monkeypatch, tmp_path):
    for name in (
        'AWS_ACCESS_KEY_ID',
        'AWS_SECRET_ACCESS_KEY',
        'AWS_SESSION_TOKEN',
        'AWS_PROFILE',
        'AWS_DEFAULT_PROFILE',
    ):
        monkeypatch.delenv(name, raising=False)
    for name in ('AWS_CONTAINER_CREDENTIALS_RELATIVE_URI', 'AWS_CONTAINER_CREDENTIALS_FULL_URI'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('AWS_SHARED_CREDENTIALS_FILE', str(tmp_path / 'no-credentials'))
    monkeypatch.setenv('AWS_CONFIG_FILE', str(tmp_path / 'no-config'))
    monkeypatch.setenv('AWS_EC2_METADATA_DISABLED', 'true')


@pytest.mark.parametrize(
    'override', ['train_dataloader.remote=s3://test-bucket/data', 'save_folder=s3://test-bucket/run/checkpoints']
)
def test_an_s3_location_without_credentials_is_named_with_how_to_provide_them(
    override, s3_server, monkeypatch, capsys, tmp_path
):
    key, location = override.split('=')
    cfg = load_config(TINY_YAML, [f'run_folder={tmp_path}', override])
    check_s3_credentials(cfg)  # with the server's credentials, the same config passes
    _no_aws_credentials(monkeypatch, tmp_path)
    monkeypatch.setattr('diffusion.builders.build_model', nothing_is_built)
    with pytest.raises(SystemExit):
        main([TINY_YAML, f'run_folder={tmp_path}', override])
    error = capsys.readouterr().err
    assert error.count('\n') == 1, error
    assert f'error: {key}={location}: no AWS credentials found' in error
    assert 'AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE' in error and 'S3_ENDPOINT_URL' in error
    monkeypatch.setenv('AWS_PROFILE', 'nobody')
    with pytest.raises(ConfigError, match=rf'{key}={location}: cannot read AWS credentials \(.*nobody'):
        check_s3_credentials(cfg)


# Item 9: Hydra's advice for a key the yaml lacks is to add '+', which for a typo is the wrong fix.
def test_a_misspelled_override_gets_the_unknown_key_line_not_hydras_advice(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr('diffusion.builders.build_model', nothing_is_built)
    with pytest.raises(SystemExit):
        main([TINY_YAML, f'run_folder={tmp_path}', 'model.caption_drop_prb=0.2'])
    error = capsys.readouterr().err
    assert error.count('\n') == 1, error
    assert error.startswith('error: Unknown key model.caption_drop_prb. Valid keys: ') and 'caption_drop_prob' in error
    assert '+model' not in error
    with pytest.raises(ConfigError, match=r"Unknown config key 'max_duraton'. Valid top-level keys: model, "):
        load_config(TINY_YAML, ['max_duraton=5ba'])


def test_an_override_of_a_valid_key_that_the_yaml_lacks_is_added():
    cfg = load_config(TINY_YAML, ['model.train_text_encoder=true', 'callbacks.speed_monitor.window_size=3'])
    assert cfg.model.train_text_encoder is True and cfg.callbacks.speed_monitor.window_size == 3
    check_sections(cfg)
    # Keys below what the registries check still need Hydra's '+': they reach libraries unchecked.
    with pytest.raises(ConfigError, match=r'\+model.unet_config.sample_size=4'):
        load_config(TINY_YAML, ['model.unet_config.sample_size=4'])
    # An optional section given by keys alone needs its name.
    with pytest.raises(ConfigError, match='eval_dataloader.*needs a "name" key'):
        load_config(TINY_YAML, ['eval_dataloader.batch_size=4'])
