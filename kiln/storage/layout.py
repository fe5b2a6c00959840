"""The file names of a kiln folder."""

from __future__ import annotations

CONFIG_FILE = "config.json"  # the spec, storage types, token ids, origin and weight files
WEIGHTS_FILE = "model.safetensors"  # the weights, when they fit in one shard
