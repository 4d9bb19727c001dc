"""Turn a validated config into a Composer ``Trainer``: the only config-to-object code.

Every component comes from :mod:`diffusion.registry` by name; everything else (checkpointing to a folder or object
store, autoresume, DDP or FSDP, precision, microbatching) is Composer's ``Trainer`` configured from the yaml.
:mod:`diffusion.train` fits what :func:`build_trainer` returns; the inference and pipeline commands rebuild a run's
model with :func:`build_model`.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from typing import Any

import torch
from composer import Callback, Trainer
from composer.devices import DeviceCPU, DeviceGPU
from composer.utils import dist, maybe_create_object_store_from_uri, parse_uri, partial_format, reproducibility
from omegaconf import DictConfig, OmegaConf

from diffusion import registry
from diffusion.callbacks.frozen_base import FrozenBaseCheckpoint
from diffusion.callbacks.pretrained_components import PretrainedComponentsInCheckpoint
from diffusion.checkpointing import (
    CONFIG_FILENAME,
    LATEST_CHECKPOINT,
    MANIFEST_SUFFIX,
    CheckpointManifests,
    RunConfigInCheckpoint,
    StrictModelWeights,
    guard_checkpoint_loading,
    is_inside,
)
from diffusion.config import check_s3_credentials, validate_config
from diffusion.models.adapters import apply_adapters
from diffusion.optim import apply_tf32, parameter_groups
from diffusion.parallelism import check_parallelism_config, resolve_parallelism
from diffusion.utils import ConfigError, wait_for_composer_env_probe

__all__ = [
    'RestoreRngMidEpoch',
    'build_dataloader',
    'build_model',
    'build_optimizer',
    'build_plugins',
    'build_trainer',
    'check_resolution',
    'check_save_folder',
    'check_sections',
]


def _section(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


def build_model(model_cfg: Any):
    """The ComposerModel named by ``model.name``, with the ``model.adapters`` applied (before any optimizer)."""
    kwargs = _section(model_cfg)
    adapters = kwargs.pop('adapters', None) or {}
    model = registry.models.build(kwargs.pop('name'), kwargs, where='model')
    if adapters:
        if not hasattr(model, 'adapters'):
            raise ValueError(f'model.adapters: {type(model).__name__} takes no adapters.')
        apply_adapters(model, [_build_adapter(name, options) for name, options in adapters.items()])
    return model


def _build_adapter(name: str, options: Any) -> Any:
    adapter = registry.adapters.build(name, options or {}, where=f'model.adapters.{name}')
    adapter.name = name
    return adapter


def build_dataloader(dataloader_cfg: Any, model: Any, where: str):
    """A dataloader named by ``<where>.name``; gets the model's tokenizer when its builder takes one."""
    kwargs = _section(dataloader_cfg)
    name = kwargs.pop('name')
    extra = {}
    if 'tokenizer' in inspect.signature(registry.dataloaders.get(name)).parameters:
        conditioner = getattr(model, 'conditioner', None)  # the autoencoder model has none
        extra['tokenizer'] = conditioner.tokenizer if conditioner is not None else None
    try:
        return registry.dataloaders.build(name, kwargs, where=where, **extra)
    except (FileNotFoundError, ValueError) as error:
        if where in str(error):
            raise
        # Name the config section: 'train_dataloader: No MDS dataset at ...' says which of the two is wrong.
        raise type(error)(f'{where}: {error}') from error


def build_optimizer(optimizer_cfg: Any, model: Any):
    """The optimizer named by ``optimizer.name`` over the parameters that require gradients; with
    ``optimizer.text_encoder_lr``, the text encoders' trainable weights form a second group at that learning rate
    (:func:`diffusion.optim.parameter_groups`)."""
    kwargs = _section(optimizer_cfg)
    params = parameter_groups(model, kwargs.pop('text_encoder_lr', None))
    return registry.optimizers.build(kwargs.pop('name'), kwargs, where='optimizer', params=params)


def build_plugins(section: str, cfg: Any) -> list:
    """Algorithms, callbacks or loggers from a ``{registry name: kwargs}`` section."""
    reg = getattr(registry, section)
    return [reg.build(name, kwargs, where=f'{section}.{name}') for name, kwargs in _section(cfg).items()]


def check_sections(cfg: DictConfig) -> None:
    """Check every registry name and key in ``cfg`` before anything is built, so typos fail in seconds."""
    for section, reg in (
        ('model', registry.models),
        ('optimizer', registry.optimizers),
        ('scheduler', registry.schedulers),
        ('train_dataloader', registry.dataloaders),
        ('eval_dataloader', registry.dataloaders),
    ):
        if cfg[section]:  # optional sections are empty when unused
            kwargs = _section(cfg[section])
            if section == 'model':
                _check_model_components(kwargs)
            if section == 'optimizer':
                kwargs.pop('text_encoder_lr', None)  # build_optimizer's, not the optimizer class's
            provided = ('params',) if section == 'optimizer' else ('tokenizer',) if 'dataloader' in section else ()
            reg.check(kwargs.pop('name'), kwargs, where=section, provided=provided)
    for section in ('algorithms', 'callbacks', 'loggers'):
        for name, kwargs in _section(cfg[section]).items():
            getattr(registry, section).check(name, kwargs, where=f'{section}.{name}')
    check_parallelism_config(_section(cfg.parallelism_config))


# Model-section keys that name a component from a registry: {name: ..., <its arguments>}.
_COMPONENT_SECTIONS = {
    'denoiser': registry.denoisers,
    'text_conditioner': registry.text_conditioners,
    'objective': registry.objectives,
}


def _check_model_components(kwargs: dict[str, Any]) -> None:
    """Check the model's component sections and adapters (popping the adapters, which build_model applies)."""
    for name, options in (kwargs.pop('adapters', None) or {}).items():
        registry.adapters.check(name, options or {}, where=f'model.adapters.{name}')
    for key, component_registry in _COMPONENT_SECTIONS.items():
        section = kwargs.get(key)
        if isinstance(section, str):  # a name alone: that component with its defaults
            section = {'name': section}
        if isinstance(section, dict) and 'name' in section:
            options = {k: v for k, v in section.items() if k != 'name'}
            # pretrained and load come from the model's pretrained_* keys, not from the section.
            component_registry.check(section['name'], options, where=f'model.{key}', provided=('pretrained', 'load'))


def check_resolution(cfg: DictConfig, model: Any) -> None:
    """Refuse a dataloader ``resolution`` that is not a multiple of the model's VAE factor (pixels per latent) times
    its denoiser's patch size (pixels of latent per token, for a transformer).

    Such images do not map to whole latents: the VAE rounds them and the run trains on what it was not asked to.
    The factor is known once the model is built (it follows the autoencoder's config or pretrained folder), so this
    runs right after the model, before the dataloaders and the Trainer.
    """
    # The VAE factor times the denoiser's patch size (MMDiT: 2), when the model has a patch size.
    factor = getattr(model, 'resolution_multiple', getattr(model, 'vae_scale_factor', None))
    if not isinstance(factor, int) or factor <= 1:
        return
    vae_factor = getattr(model, 'vae_scale_factor', factor)
    patch = f" times its denoiser's patch size ({factor // vae_factor})" if factor != vae_factor else ''
    for section in ('train_dataloader', 'eval_dataloader'):
        kwargs = _section(cfg[section])
        resolution = kwargs.get('resolution')
        if not kwargs or kwargs.get('aspect_buckets') is not None or not isinstance(resolution, int):
            continue  # unset (the builder's default), or buckets, whose sides are checked with the buckets
        if resolution % factor:
            lower, upper = resolution // factor * factor, (resolution // factor + 1) * factor
            nearest = f'{lower} or {upper}' if lower else str(upper)
            raise ConfigError(
                f'Invalid {section}.resolution={resolution}: expected a multiple of {factor}, the VAE factor of '
                f'{cfg.model.name} (its vae_scale_factor, pixels per latent side){patch}, e.g. {nearest}.'
            )


def check_precomputed_text(model: Any, dataloaders: dict[str, Any]) -> None:
    """Refuse, before training, precomputed text embeddings that another text encoder or length produced: the
    shards' record (e.g. T5's ``t5_encoder`` and ``t5_max_length``) is checked by the model's text conditioner."""
    check = getattr(getattr(model, 'conditioner', None), 'check_precomputed_record', None)
    for where, loader in dataloaders.items():
        record = getattr(getattr(loader, 'dataset', None), 'precomputed_record', None)
        if check is not None and record is not None:
            check(record(), where)


def _is_checkpoint_file(name: str) -> bool:
    """A file a Composer save writes: a ``.pt`` (or the ``latest`` link), its manifest, a sharded folder's files."""
    base = name.rsplit('/', 1)[-1]
    return base.endswith(('.pt', MANIFEST_SUFFIX, '.symlink', '.distcp')) or base == '.metadata'


def _saved_checkpoints(folder: str) -> tuple[list[str], str]:
    """The checkpoint files in ``folder`` (local or object store, and one level down for sharded checkpoints), and
    the name its ``latest`` pointer names ('' when there is none)."""
    backend, _, prefix = parse_uri(folder)
    if backend:
        store = maybe_create_object_store_from_uri(folder)
        prefix = prefix.rstrip('/') + '/'
        names = [n[len(prefix) :] for n in store.list_objects(prefix)]
        found = [n for n in names if n.count('/') <= 1 and _is_checkpoint_file(n)]
        latest = ''
        if f'{LATEST_CHECKPOINT}.symlink' in names:
            with tempfile.TemporaryDirectory() as scratch:
                local = os.path.join(scratch, 'latest')
                store.download_object(f'{prefix}{LATEST_CHECKPOINT}.symlink', local)
                with open(local) as f:
                    latest = f.read().strip().rsplit('/', 1)[-1]
        return found, latest
    if not os.path.isdir(folder):
        return [], ''
    found = []
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            found += [f'{entry.name}/{n}' for n in os.listdir(entry.path) if _is_checkpoint_file(n)]
        elif _is_checkpoint_file(entry.name):
            found.append(entry.name)
    link = os.path.join(folder, LATEST_CHECKPOINT)
    return found, os.path.basename(os.readlink(link)) if os.path.islink(link) else ''


def check_save_folder(cfg: DictConfig) -> None:
    """Refuse to start a new run in a ``save_folder`` that holds the checkpoints of another run.

    A run that starts from scratch there (even with the same command: README's first two Train commands in a row)
    would overwrite the checkpoints of the same names, leave the others, point ``latest`` at either run's batch and
    append to the run's ledger: one folder, two runs, no warning. So a start into a folder with checkpoints must be
    a resume of them: ``autoresume`` (the same run, restarted), or a ``load_path`` inside the folder that is not
    ``load_weights_only`` (which restarts at batch 0). Anything else is another run, and is refused before anything
    is written, naming the folder and the two ways out.
    """
    if not cfg.save_folder:
        return
    folder = partial_format(cfg.save_folder, run_name=cfg.run_name) if cfg.run_name else cfg.save_folder
    resumes = cfg.autoresume or (cfg.load_path and not cfg.load_weights_only and is_inside(cfg.load_path, folder))
    if resumes:
        return
    found, latest = _saved_checkpoints(folder)
    if found:
        shown = latest or sorted(found)[-1]
        raise ConfigError(
            f'save_folder {folder} holds the checkpoints of another run (latest: {shown}), and this start is no '
            'resume of it: the two runs would mix in one folder (checkpoints of the same names overwritten, the '
            'others kept, `latest` pointing at either). Start the new run in another folder (a new run_folder or '
            'save_folder), or continue that run with autoresume=true.'
        )


class RestoreRngMidEpoch(Callback):
    """Restore a mid-epoch checkpoint's RNG state just before the first resumed batch is fetched.

    Composer 0.32 restores the checkpoint's per-rank RNG mid-epoch only when it fast-forwards ("spins") the
    dataloader; with StreamingDataset's own resumption, which we use, the RNG would restart from the seed and the
    resumed run would draw other timesteps and noise than an uninterrupted one. ``BEFORE_DATALOADER`` fires after
    the new iterator is created (which itself draws a seed), so restoring there reproduces the uninterrupted stream.
    """

    def __init__(self, rng_state: list[dict[str, Any]]):
        self.rng_state = rng_state

    def before_dataloader(self, state, logger) -> None:
        if self.rng_state is not None:
            reproducibility.load_rng_state(self.rng_state)
            self.rng_state = None


def _restore_rng_mid_epoch(trainer: Trainer) -> None:
    # `_rng_state` is where Composer 0.32.1 keeps the loaded checkpoint's RNG until it uses it; tests in
    # tests/test_train.py fail if a Composer upgrade moves it.
    rng_state = getattr(trainer, '_rng_state', None)
    if rng_state is not None and int(trainer.state.timestamp.batch_in_epoch) > 0:
        trainer.state.callbacks.append(RestoreRngMidEpoch(rng_state))
        trainer._rng_state = None


def build_trainer(cfg: Any) -> Trainer:
    """Validate ``cfg`` and build the Trainer (nothing is trained)."""
    cfg = validate_config(cfg)
    check_sections(cfg)
    check_s3_credentials(cfg)  # before any bucket is reached (streaming and Composer would retry without naming it)
    guard_checkpoint_loading(cfg)  # before the Trainer, which loads any checkpoint
    check_save_folder(cfg)  # before anything is written in the run folder
    device = cfg.device or ('gpu' if torch.cuda.is_available() else 'cpu')
    dist.initialize_dist(DeviceGPU() if device == 'gpu' else DeviceCPU(), cfg.dist_timeout)
    apply_tf32(cfg.tf32, device)
    reproducibility.seed_all(cfg.seed)
    if cfg.run_folder:
        os.makedirs(cfg.run_folder, exist_ok=True)
        if dist.get_global_rank() == 0:
            OmegaConf.save(cfg, os.path.join(cfg.run_folder, CONFIG_FILENAME))

    model = build_model(cfg.model)
    check_resolution(cfg, model)
    train_dataloader = build_dataloader(cfg.train_dataloader, model, 'train_dataloader')
    eval_dataloader = None
    if cfg.eval_dataloader:
        eval_dataloader = build_dataloader(cfg.eval_dataloader, model, 'eval_dataloader')
    check_precomputed_text(model, {'train_dataloader': train_dataloader, 'eval_dataloader': eval_dataloader})
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = None
    if cfg.scheduler:
        kwargs = _section(cfg.scheduler)
        scheduler = registry.schedulers.build(kwargs.pop('name'), kwargs, where='scheduler')

    wait_for_composer_env_probe()  # train.py started it; the Trainer would otherwise run it again
    trainer = Trainer(
        run_name=cfg.run_name,
        model=model,
        train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader,
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=build_plugins('algorithms', cfg.algorithms),
        callbacks=[
            *build_plugins('callbacks', cfg.callbacks),
            CheckpointManifests(),
            RunConfigInCheckpoint(cfg),
            StrictModelWeights(cfg.load_strict_model_weights),
            PretrainedComponentsInCheckpoint(model, cfg.model),  # a checkpoint rebuilds without the pretrained folder
            # An adapter run saves its trainable weights and the base's digest; after StrictModelWeights, so that
            # the frozen weights are filled in before the strict check.
            *([FrozenBaseCheckpoint(model, _section(cfg.model))] if getattr(model, 'adapters', None) else []),
        ],
        loggers=build_plugins('loggers', cfg.loggers),
        device=device,
        precision=cfg.precision,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        eval_interval=cfg.eval_interval,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        load_path=cfg.load_path,
        load_weights_only=cfg.load_weights_only,
        load_strict_model_weights=cfg.load_strict_model_weights,
        autoresume=cfg.autoresume,
        progress_bar=cfg.progress_bar,
        log_to_console=cfg.log_to_console,
        console_log_interval=cfg.console_log_interval,
        seed=cfg.seed,
        deterministic_mode=cfg.deterministic_mode,
        dist_timeout=cfg.dist_timeout,
        parallelism_config=resolve_parallelism(_section(cfg.parallelism_config), device, model),
        python_log_level=cfg.python_log_level,
    )
    _restore_rng_mid_epoch(trainer)
    return trainer
