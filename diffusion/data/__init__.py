"""Streaming datasets of image-caption shards and the synthetic Creative-Commons-like data generator."""

from diffusion.data import shm_prefix
from diffusion.data.faults import FaultTolerantStreamingDataset, ShardDownloadError, UnusableSample
from diffusion.data.image_caption import StreamingImageCaptionDataset, build_image_caption_dataloader
from diffusion.data.replaced_sample_monitor import ReplacedSampleMonitor
from diffusion.data.shard_integrity import SHARD_HASHES, ShardIntegrityError
from diffusion.data.synthetic import render_sample, write_synthetic_dataset

# Before any dataset is built: jobs on one node that start together must not claim the same shared memory.
shm_prefix.install()

__all__ = [
    'SHARD_HASHES',
    'FaultTolerantStreamingDataset',
    'ReplacedSampleMonitor',
    'ShardDownloadError',
    'ShardIntegrityError',
    'StreamingImageCaptionDataset',
    'UnusableSample',
    'build_image_caption_dataloader',
    'render_sample',
    'write_synthetic_dataset',
]
