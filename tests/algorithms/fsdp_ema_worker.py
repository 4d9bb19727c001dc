"""Two-rank worker for tests/algorithms/test_sharded_ema.py (run under ``composer -n 2``, gloo on CPU).

Shards the tiny model's children with torch FSDP the way Composer's FSDP integration does (one FSDP root per child
of the ComposerModel, inner units from the ``_fsdp_wrap`` markers), trains it a few steps next to an unsharded copy,
and checks that ShardedEMA's average equals Composer's EMA on the copy, that the ``save_pretrained`` export (run on
every rank) writes that average, that sampling the sharded model gives the unsharded model's images, and that a
sharded trained text encoder and an FSDP2 (``fully_shard``) UNet unshard to their exact weights. Prints
``OK <max abs diffs>`` on rank 0.
"""

import copy
import os
import sys

import torch
from composer.algorithms import EMA
from composer.core import Event, State
from composer.devices import DeviceCPU
from composer.loggers import Logger
from composer.utils import dist
from diffusers import UNet2DConditionModel
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp.wrap import CustomPolicy

from diffusion.algorithms.sharded_ema import ShardedEMA
from diffusion.callbacks.save_pretrained import SavePretrained
from diffusion.parallelism import full_parameters, mark_fsdp_units, unsharded
from tests.conftest import build_tiny_sd, max_abs_diff


def shard_like_composer(model: torch.nn.Module) -> None:
    for name, child in list(model.named_children()):
        if getattr(child, '_fsdp_wrap', True) is False or not list(child.parameters()):
            continue
        policy = CustomPolicy(lambda module: getattr(module, '_fsdp_wrap', False) is True)
        wrapped = FSDP(child, auto_wrap_policy=policy, device_id=torch.device('cpu'), use_orig_params=True)
        setattr(model, name, wrapped)


def make_state(model: torch.nn.Module) -> State:
    return State(model=model, rank_zero_seed=0, run_name='fsdp-ema', device=DeviceCPU(), max_duration='10ba')


def step(model, optimizer, batch, seed: int) -> None:
    torch.manual_seed(seed)  # the same noise and timesteps on both models and both ranks
    model.loss(model(batch), batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_events(algorithm, state, logger, events) -> None:
    for event in events:
        if algorithm.match(event, state):
            algorithm.apply(event, state, logger)


def main() -> None:
    dist.initialize_dist(DeviceCPU())
    torch.manual_seed(0)
    sharded = build_tiny_sd()
    reference = copy.deepcopy(sharded)
    mark_fsdp_units(sharded)
    shard_like_composer(sharded)
    assert isinstance(sharded.unet, FSDP) and not isinstance(sharded.vae, FSDP)

    # Composer's own EMA cannot average a model whose children are sharded.
    try:
        EMA(half_life='2ba', ema_start='0ba').apply(Event.INIT, make_state(sharded), Logger(make_state(sharded)))
        composer_error = 'none'
    except AttributeError as error:
        composer_error = str(error)

    batch = {'image': torch.rand(2, 3, 16, 16) * 2 - 1, 'captions': ['a red circle', 'a blue square']}
    runs = []
    for model, algorithm in ((sharded, ShardedEMA(half_life='2ba', ema_start='1ba')),
                             (reference, EMA(half_life='2ba', ema_start='1ba'))):  # fmt: skip
        state = make_state(model)
        logger = Logger(state)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        run_events(algorithm, state, logger, [Event.INIT, Event.FIT_START])
        for index in range(4):
            run_events(algorithm, state, logger, [Event.BATCH_START])
            step(model, optimizer, batch, seed=index)
            state.timestamp = state.timestamp.to_next_batch(samples=2, tokens=0)
            run_events(algorithm, state, logger, [Event.BATCH_END])
        runs.append((algorithm, state))

    (sharded_ema, sharded_state), (reference_ema, reference_state) = runs
    averaged = sharded_ema.ema_model.named_parameters_dict
    expected = reference_ema.ema_model.named_parameters_dict
    assert set(averaged) == set(expected), sorted(set(averaged) ^ set(expected))[:5]
    diff = max_abs_diff(averaged, expected)
    # Swapping in the EMA weights (what sampling and export do) gives the averaged UNet on every rank.
    sharded_ema._ensure_ema_weights_active(sharded_state)
    with full_parameters(sharded):
        unet = {f'unet.{k}': v.detach().clone() for k, v in sharded.unet.named_parameters()}
    sharded_ema._ensure_training_weights_active(sharded_state)
    unet = {k.replace('_fsdp_wrapped_module.', ''): v for k, v in unet.items()}
    swap_diff = max_abs_diff(expected, unet)
    trained = {f'unet.{k}': v for k, v in reference.unet.named_parameters()}
    train_diff = max_abs_diff(expected, trained)
    # Export on every rank, as the callback runs at fit end: rank 0 alone would start an all-gather nobody joins.
    folder = sys.argv[1]
    sharded_state.algorithms = [sharded_ema]
    SavePretrained(folder, components=['unet']).fit_end(sharded_state, Logger(sharded_state))
    # Sampling (the image-logging and metric callbacks) runs the sharded UNet on every rank.
    sample_kwargs = dict(num_inference_steps=2, guidance_scale=2.0, seed=3)
    sample_diff = float((sharded.generate(['a red circle'], **sample_kwargs) -
                         reference.generate(['a red circle'], **sample_kwargs)).abs().max())  # fmt: skip
    # A text encoder that trains is sharded too; its unsharded copy (a transformers model) holds its weights.
    torch.manual_seed(1)
    with_encoder = build_tiny_sd(train_text_encoder=True)
    encoder_reference = copy.deepcopy(with_encoder.text_encoder).state_dict()
    mark_fsdp_units(with_encoder)
    shard_like_composer(with_encoder)
    assert isinstance(with_encoder.text_encoder, FSDP)
    encoder = unsharded(with_encoder.text_encoder)
    # FSDP2 (fully_shard): DTensor parameters, and a swapped-in FSDP<class> that export must not write.
    torch.manual_seed(2)
    unet2 = build_tiny_sd().unet
    unet2_reference = copy.deepcopy(unet2).state_dict()
    for block in [*unet2.down_blocks, unet2.mid_block, *unet2.up_blocks]:
        fully_shard(block)
    fully_shard(unet2)
    plain2 = unsharded(unet2)
    if dist.get_global_rank() == 0:
        assert type(plain2) is UNet2DConditionModel, type(plain2)
        fsdp2_state = plain2.state_dict()
        assert set(fsdp2_state) == set(unet2_reference), sorted(set(fsdp2_state) ^ set(unet2_reference))[:5]
        fsdp2_diff = max_abs_diff(fsdp2_state, unet2_reference)
        encoder_state = encoder.state_dict()
        assert set(encoder_state) == set(encoder_reference), sorted(set(encoder_state) ^ set(encoder_reference))[:5]
        encoder_diff = max_abs_diff(encoder_state, encoder_reference)
        exported = UNet2DConditionModel.from_pretrained(os.path.join(folder, 'unet')).state_dict()
        assert {f'unet.{k}' for k in exported} >= set(expected), sorted(set(expected) - set(exported))[:5]
        export_diff = max_abs_diff({f'unet.{k}': v for k, v in exported.items()}, expected)
        print(f'composer_error={composer_error!r}')
        diffs = dict(ema_diff=diff, swap_diff=swap_diff, train_diff=train_diff, params=len(expected),
                     export_diff=export_diff, sample_diff=sample_diff, encoder_diff=encoder_diff,
                     fsdp2_diff=fsdp2_diff)  # fmt: skip
        print('OK ' + ' '.join(f'{name}={value:.3g}' if isinstance(value, float) else f'{name}={value}'
                               for name, value in diffs.items()))  # fmt: skip
    sys.stdout.flush()


if __name__ == '__main__':
    main()
