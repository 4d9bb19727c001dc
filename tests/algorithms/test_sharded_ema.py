"""ShardedEMA: Composer's EMA, also correct when the UNet is FSDP-sharded (checked on CPU with gloo)."""

import os
import re

import pytest

from diffusion.parallelism import clean_parameter_name
from tests.conftest import REPO_ROOT, run_script


def test_wrapper_prefixes_are_removed_from_names():
    name = 'unet._fsdp_wrapped_module.down_blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.conv.weight'
    assert clean_parameter_name(name) == 'unet.down_blocks.0.conv.weight'


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_the_average_of_a_sharded_unet_equals_the_unsharded_one_and_is_what_export_writes(tmp_path):
    worker = os.path.join(REPO_ROOT, 'tests', 'algorithms', 'fsdp_ema_worker.py')
    stdout = run_script(worker, str(tmp_path / 'export'), processes=2)
    # The failure this class exists for: Composer's EMA on a ComposerModel whose children are FSDP modules.
    assert "composer_error=\"'StableDiffusion' object has no attribute 'module'\"" in stdout
    names = (
        'ema_diff',
        'swap_diff',
        'train_diff',
        'params',
        'export_diff',
        'sample_diff',
        'encoder_diff',
        'fsdp2_diff',
    )
    match = re.search('OK ' + ' '.join(rf'{name}=(\S+)' for name in names), stdout)
    assert match, stdout[-2000:]
    ema_diff, swap_diff, train_diff, _, export_diff, sample_diff, encoder_diff, fsdp2_diff = map(float, match.groups())
    assert ema_diff <= 1e-6 and swap_diff <= 1e-6  # the same average, and it is what sampling/export see
    assert train_diff > 1e-4  # ...which differs from the raw trained weights
    assert int(match.group(4)) > 100
    # The export from the sharded run holds the full averaged UNet (before the fix, rank 0's save_pretrained
    # started an all-gather that rank 1 never joined, and the run crashed); sampling matches the unsharded model.
    assert export_diff <= 1e-6
    assert sample_diff <= 1e-5
    assert encoder_diff == 0  # a trained text encoder, sharded, unshards to its exact weights
    assert fsdp2_diff == 0  # so does a UNet sharded with FSDP2's fully_shard (DTensor parameters)
