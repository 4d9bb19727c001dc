"""Worker of tests/data/test_aspect_buckets.py, run as ``composer -n <ranks> tests/data/aspect_bucket_worker.py``.

Iterates the bucketed image-caption dataloader on every rank and writes ``<out>/rank<R>.json``:
``{"epochs": [[{"ids": [...], "shape": [H, W], "target": [[H, W], ...]}, ...], ...], "resumed": [...],
"after_resume": [...]}``. ``resumed`` is epoch 0 after ``--resume-after`` steps, from a checkpointed state loaded
into a fresh dataloader (with the global sample count, as Composer gives it); ``after_resume`` the epoch after it.
"""

import argparse
import json
import os

import torch
from composer.devices import DeviceCPU
from composer.utils import dist

from diffusion.data.image_caption import build_image_caption_dataloader


def record(batch) -> dict:
    return {
        'ids': batch['sample_index'].tolist(),
        'shape': list(batch['image'].shape[-2:]),
        'target': batch['cond_target_size'].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--data', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--buckets', required=True, help='JSON list of [height, width]')
    parser.add_argument('--batch-size', type=int, required=True, help='global batch size')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--resume-after', type=int, default=0, help='steps of epoch 0 before the checkpoint')
    parser.add_argument('--seed', type=int, default=9176)
    args = parser.parse_args()
    dist.initialize_dist(DeviceCPU())

    def loader():
        return build_image_caption_dataloader(
            args.data,
            batch_size=args.batch_size,
            aspect_buckets=json.loads(args.buckets),
            micro_conditioning=True,
            crop='random',
            shuffle_seed=args.seed,
        )

    full = loader()
    result = {'num_steps': len(full), 'epochs': [[record(batch) for batch in full] for _ in range(args.epochs)]}
    if args.resume_after:
        first = loader()
        trained = 0
        for step, batch in enumerate(first):
            trained += len(batch['sample_index'])
            if step + 1 == args.resume_after:
                break
        # Composer's sample_in_epoch counts the samples of every rank.
        total = torch.tensor([trained])
        dist.all_reduce(total)
        state = first.dataset.state_dict(int(total), True)
        resumed = loader()
        resumed.dataset.load_state_dict(state)
        result['resumed'] = [record(batch) for batch in resumed]
        result['after_resume'] = [record(batch) for batch in resumed]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f'rank{dist.get_global_rank()}.json'), 'w') as f:
        json.dump(result, f)


if __name__ == '__main__':
    main()
