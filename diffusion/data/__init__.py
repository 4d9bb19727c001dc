"""Streaming datasets of image-caption shards and the synthetic Creative-Commons-like data generator."""

from diffusion.data.image_caption import StreamingImageCaptionDataset, build_image_caption_dataloader
from diffusion.data.synthetic import render_sample, write_synthetic_dataset

__all__ = ['StreamingImageCaptionDataset', 'build_image_caption_dataloader', 'render_sample', 'write_synthetic_dataset']
