"""Streaming dataset of precomputed latents: training without running the VAE or the text encoder.

Reads the shards that ``python -m diffusion.pipeline precompute`` writes (built on mosaicml-streaming's
``StreamingDataset`` and its ``ndarray`` encoding): the VAE posterior's moments ``image_latents_mean`` and
``image_latents_std`` (or a sample, ``image_latents``), unscaled, and the text encoder's ``text_embeds`` (plus
``pooled_text_embeds`` when the model has one; T5 conditioners store ``t5_embeds`` cut to each caption's tokens,
padded back here to ``t5_max_length`` with zeros and a ``t5_attention_mask``, and SD3's ``clip_embeds``), stored in
fp16, bf16 or fp32 and returned as fp32 tensors. The model
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
    'T5_RECORD_COLUMNS',
    'from_stored',
    'pad_t5',
    'to_stored',
]

# Tensor columns a latent shard may hold; each is returned when present (see diffusion.data.batch).
LATENT_COLUMNS = (*IMAGE_LATENT_KEYS, 'text_embeds', 'pooled_text_embeds', 'clip_embeds', 't5_embeds')
#: Columns that record what made a shard's T5 states (checked against the model before training).
T5_RECORD_COLUMNS = ('t5_max_length', 't5_encoder')
STORAGE_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def to_stored(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array stored in a shard; bf16, which numpy lacks, travels as its int16 bit pattern."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f'Unknown latent storage dtype {dtype!r}. Valid values: {", ".join(STORAGE_DTYPES)}.')
    converted = tensor.detach().to('cpu', STORAGE_DTYPES[dtype]).contiguous()
    return converted.view(torch.int16).numpy() if dtype == 'bfloat16' else converted.numpy()


def from_stored(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The fp32 tensor of an array written by :func:`to_stored` with ``dtype`` (a copy: shard memory is read-only).

    Converted in numpy, exactly (a bf16 value is the top half of its fp32 bits): for the small arrays of one sample,
    numpy's calls cost a fraction of torch's, and this runs for every sample on the training process.
    """
    if dtype == 'bfloat16':
        values = (np.asarray(array).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.array(array, dtype=np.float32)
    return torch.from_numpy(values)


def pad_t5(states: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 states (L, D) stored trimmed, padded with zeros to (max_length, D), and their attention mask (max_length,)."""
    length = states.shape[0]
    if length > max_length:
        raise ValueError(f'A stored T5 embedding has {length} tokens, more than its t5_max_length={max_length}.')
    mask = torch.zeros(max_length, dtype=torch.long)
    mask[:length] = 1
    return torch.nn.functional.pad(states, (0, 0, 0, max_length - length)), mask


class StreamingLatentDataset(FaultTolerantStreamingDataset):
    """Precomputed latents and text embeddings as fp32 tensors, with ``captions``, ``sample_index`` and ``replaced``.

    Args:
        **streaming_kwargs: Passed to :class:`~diffusion.data.faults.FaultTolerantStreamingDataset`
            (``validate_hash``, ``verify_local_shards``, ``max_replacement_tries``) and ``StreamingDataset``
            (``remote``, ``local``, ``shuffle``, ``batch_size``, ...).
    """

    def precomputed_record(self) -> dict[str, Any]:
        """What made the shards' T5 states (:data:`T5_RECORD_COLUMNS`, from the first sample); empty without them."""
        if not self.num_samples:
            return {}
        sample = self.get_item(0)
        return {key: sample[key] for key in T5_RECORD_COLUMNS if key in sample}

    def load_sample(self, index: int) -> dict[str, Any]:
        """Sample ``index`` as fp32 tensors; :class:`UnusableSample` when a tensor holds NaN or inf."""
        sample = self.get_item(index)
        has_text = 'text_embeds' in sample or 't5_embeds' in sample
        if not has_text or not ({'image_latents', 'image_latents_mean'} & set(sample)):
            raise KeyError(
                f'Sample {index} is not a precomputed-latent sample (columns {sorted(sample)}); '
                'write such shards with `python -m diffusion.pipeline precompute`.'
            )
        dtype = sample.get('latents_dtype', 'float32')
        out: dict[str, Any] = {k: from_stored(sample[k], dtype) for k in LATENT_COLUMNS if k in sample}
        non_finite = [key for key, tensor in out.items() if not np.isfinite(tensor.numpy()).all()]
        if non_finite:
            source = sample.get('source_url') or sample.get('key') or None
            raise UnusableSample('non_finite', f'{", ".join(non_finite)} hold NaN or inf', source)
        if 't5_embeds' in out:  # trimmed to the caption's tokens: pad back with zeros, as a masked T5 leaves them
            out['t5_embeds'], out['t5_attention_mask'] = pad_t5(out['t5_embeds'], int(sample['t5_max_length']))
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
