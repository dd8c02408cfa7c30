"""Data preparation: corpus -> sentencepiece tokenizer -> parameter-golf token shards + manifest."""
from .shards import find_shards, load_split, read_shard, write_shard

__all__ = ["find_shards", "load_split", "read_shard", "write_shard"]
