"""Data preparation: ingest, filter, caption and write Creative-Commons image-caption shards."""
