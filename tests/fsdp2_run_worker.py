"""Two-rank worker for tests/test_parallelism.py (``FSDP_VERSION=2 composer -n 2``, gloo on CPU).

Trains the test-size model with Composer's FSDP2 (``fully_shard``) from the ``fsdp`` section, with scheduled EMA and
activation checkpointing, three ways: 6 batches straight, 3 batches with a checkpoint, and a resume from it to 6.
Prints on rank 0 what the test checks: whether the UNet was sharded, how far the resumed run's weights and EMA
averages are from the straight run's, how far the average is from the weights, and how far the ``save_pretrained``
export is from the average.
"""

import os
import sys

from composer.utils import dist
from diffusers import UNet2DConditionModel
from torch.distributed.tensor import DTensor

from diffusion.builders import build_trainer
from diffusion.callbacks.ema_weights import find_ema
from diffusion.parallelism import clean_parameter_name
from tests.conftest import EMA_TEST_OVERRIDES, max_abs_diff, tiny_config


def whole(tensors: dict) -> dict:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone() for k, v in tensors.items()}


def main() -> None:
    data, root = sys.argv[1], sys.argv[2]
    fsdp = '+parallelism_config={fsdp: {state_dict_type: full, activation_checkpointing: true}}'
    common = (fsdp, *EMA_TEST_OVERRIDES, 'save_interval=3ba')

    def fit(name: str, *overrides: str):
        trainer = build_trainer(tiny_config(data, os.path.join(root, name), *common, *overrides))
        trainer.fit()
        unet = trainer.state.model.unet
        return trainer, whole({f'unet.{clean_parameter_name(k)}': v for k, v in unet.named_parameters()})

    export = f'+callbacks.save_pretrained={{folder: {root}/export, components: [unet]}}'
    # No checkpoint at the end of the compared runs: one swaps the average into the model (Composer's EMA).
    straight, trained = fit('straight', 'max_duration=6ba', 'save_folder=null', export)
    sharded = isinstance(next(straight.state.model.unet.parameters()), DTensor)
    average = whole(find_ema(straight.state).ema_model.named_parameters_dict)
    fit('part', 'max_duration=3ba')
    checkpoint = os.path.join(root, 'part', 'checkpoints', 'ep0-ba3-rank0.pt')
    resumed, resumed_trained = fit(
        'resumed', 'max_duration=6ba', 'save_folder=null', f'load_path={checkpoint}', 'load_trusted=true'
    )
    resumed_average = whole(find_ema(resumed.state).ema_model.named_parameters_dict)
    if dist.get_global_rank() == 0:
        exported = UNet2DConditionModel.from_pretrained(os.path.join(root, 'export', 'unet')).state_dict()
        diffs = dict(
            weights=max_abs_diff(resumed_trained, trained),
            ema=max_abs_diff(resumed_average, average),
            gap=max_abs_diff(average, trained),
            export=max_abs_diff({f'unet.{k}': v for k, v in exported.items()}, average),
        )
        print(f'sharded={sharded} ' + ' '.join(f'{name}={value:.3g}' for name, value in diffs.items()))
    sys.stdout.flush()


if __name__ == '__main__':
    main()
