"""Streaming dataset of precomputed latents: training without running the VAE or the text encoder.

Reads the shards that ``python -m diffusion.pipeline precompute`` writes (built on mosaicml-streaming's
``StreamingDataset`` and its ``ndarray`` encoding): the VAE posterior's moments ``image_latents_mean`` and
``image_latents_std`` (or a sample, ``image_latents``), unscaled, and the text encoder's ``text_embeds`` (plus
``pooled_text_embeds`` when the model has one), stored in fp16, bf16 or fp32 and returned as fp32 tensors. The model
samples the posterior and applies the VAE scaling factor, so neither happens here. Provenance columns ride along.
Through :class:`~diffusion.data.faults.FaultTolerantStreamingDataset`, shards are checked and a sample holding
NaN or inf is replaced by the next usable one (``replaced = 1``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from diffusion.data.batch import IMAGE_LATENT_KEYS, MICRO_CONDITIONING_KEYS
from diffusion.data.faults import FaultTolerantStreamingDataset, UnusableSample
from diffusion.data.image_caption import per_rank_batch_size, resolve_source, streaming_dataloader
from diffusion.data.shard_integrity import AUTO

__all__ = [
    'LATENT_COLUMNS',
    'StreamingLatentDataset',
    'build_latent_dataloader',
    'from_stored',
    'to_stored',
]

# Tensor columns a latent shard may hold; each is returned when present (see diffusion.data.batch).
LATENT_COLUMNS = (*IMAGE_LATENT_KEYS, 'text_embeds', 'pooled_text_embeds')
STORAGE_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def to_stored(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array stored in a shard; bf16, which numpy lacks, travels as its int16 bit pattern."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f'Unknown latent storage dtype {dtype!r}. Valid values: {", ".join(STORAGE_DTYPES)}.')
    converted = tensor.detach().to('cpu', STORAGE_DTYPES[dtype]).contiguous()
    return converted.view(torch.int16).numpy() if dtype == 'bfloat16' else converted.numpy()


def from_stored(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The fp32 tensor of an array written by :func:`to_stored` with ``dtype``."""
    tensor = torch.from_numpy(np.array(array))  # a writable copy: shard memory is read-only
    return (tensor.view(torch.bfloat16) if dtype == 'bfloat16' else tensor).float()


class StreamingLatentDataset(FaultTolerantStreamingDataset):
    """Precomputed latents and text embeddings as fp32 tensors, with ``captions``, ``sample_index`` and ``replaced``.

    Args:
        **streaming_kwargs: Passed to :class:`~diffusion.data.faults.FaultTolerantStreamingDataset`
            (``validate_hash``, ``verify_local_shards``, ``max_replacement_tries``) and ``StreamingDataset``
            (``remote``, ``local``, ``shuffle``, ``batch_size``, ...).
    """

    def load_sample(self, index: int) -> dict[str, Any]:
        """Sample ``index`` as fp32 tensors; :class:`UnusableSample` when a tensor holds NaN or inf."""
        sample = self.get_item(index)
        if 'text_embeds' not in sample or not ({'image_latents', 'image_latents_mean'} & set(sample)):
            raise KeyError(
                f'Sample {index} is not a precomputed-latent sample (columns {sorted(sample)}); '
                'write such shards with `python -m diffusion.pipeline precompute`.'
            )
        dtype = sample.get('latents_dtype', 'float32')
        out: dict[str, Any] = {k: from_stored(sample[k], dtype) for k in LATENT_COLUMNS if k in sample}
        non_finite = [key for key, tensor in out.items() if not torch.isfinite(tensor).all()]
        if non_finite:
            source = sample.get('source_url') or sample.get('key') or None
            raise UnusableSample('non_finite', f'{", ".join(non_finite)} hold NaN or inf', source)
        for key in MICRO_CONDITIONING_KEYS:  # SDXL's size and crop conditioning, (height, width) / (top, left)
            if key in sample:
                out[key] = torch.tensor(np.array(sample[key]), dtype=torch.long)
        out['captions'] = sample.get('caption', '')
        out['sample_index'] = index
        return out


def build_latent_dataloader(
    remote: Optional[str] = None,
    local: Optional[str] = None,
    *,
    batch_size: int,
    shuffle: bool = True,
    shuffle_seed: int = 9176,
    validate_hash: Optional[str] = AUTO,
    verify_local_shards: bool = True,
    max_replacement_tries: int = 100,
    license_preset: Optional[str] = None,
    allow_changed_data: bool = False,
    num_workers: int = 0,
    drop_last: bool = True,
    streaming_kwargs: Optional[dict[str, Any]] = None,
    dataloader_kwargs: Optional[dict[str, Any]] = None,
) -> DataLoader:
    """A DataLoader over precomputed-latent MDS shards.

    Args:
        remote (str, optional): A local folder (read in place) or an object-store URL such as ``s3://bucket/path``.
        local (str, optional): Local cache folder for a remote dataset.
        batch_size (int): Global batch size, divided evenly across ranks.
        shuffle (bool): Shuffle samples (deterministic for ``shuffle_seed``). Default: ``True``.
        shuffle_seed (int): Seed of the shuffle. Default: ``9176``.
        validate_hash, verify_local_shards, max_replacement_tries, license_preset, allow_changed_data: See
            :class:`~diffusion.data.faults.FaultTolerantStreamingDataset`.
        num_workers (int): DataLoader worker processes. Default: ``0``.
        drop_last (bool): Drop the last incomplete batch. Default: ``True``.
        streaming_kwargs (dict, optional): More ``StreamingDataset`` arguments (``download_retry``, ...).
        dataloader_kwargs (dict, optional): More ``DataLoader`` arguments (``prefetch_factor``, ...).
    """
    device_batch_size = per_rank_batch_size(batch_size)
    remote, local = resolve_source(remote, local)
    dataset = StreamingLatentDataset(
        remote=remote,
        local=local,
        shuffle=shuffle,
        shuffle_seed=shuffle_seed,
        validate_hash=validate_hash,
        verify_local_shards=verify_local_shards,
        max_replacement_tries=max_replacement_tries,
        license_preset=license_preset,
        allow_changed_data=allow_changed_data,
        batch_size=device_batch_size,
        **(streaming_kwargs or {}),
    )
    return streaming_dataloader(dataset, device_batch_size, num_workers, drop_last, dataloader_kwargs)
