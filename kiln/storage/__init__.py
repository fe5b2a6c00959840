"""Storage: the kiln folder's file names and its safetensors weights (memory-mapped reads,
streamed sharded writes)."""
