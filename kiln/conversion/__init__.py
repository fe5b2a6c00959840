"""Conversion of local checkpoints (Hugging Face folders, GGUF files, CTranslate2 folders)
into kiln folders: one adapter per family (archs/), one reader per format (formats/)."""

from .convert import DEFAULT_SHARD_BYTES, QUANTIZATIONS, convert, model_kind, open_checkpoint

__all__ = ["DEFAULT_SHARD_BYTES", "QUANTIZATIONS", "convert", "model_kind", "open_checkpoint"]
