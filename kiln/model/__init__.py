"""The model: its arch-neutral spec, the one decoder, the KV cache, and loading a kiln folder."""
