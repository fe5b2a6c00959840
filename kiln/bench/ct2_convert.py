"""Convert an HF folder with CTranslate2's own converter (the peer's folder, made the peer's way).

CTranslate2 4.x reads GPT-NeoX configs by their pre-transformers-5 names; the shim below
restores them for the length of one conversion.
"""

from __future__ import annotations

from pathlib import Path


def convert_with_ctranslate2(hf_folder: Path, output: Path, quantization: str = "float32") -> Path:
    from ctranslate2.converters import transformers as ct2_transformers

    loader = ct2_transformers.GPTNeoXLoader
    original = loader.get_model_spec

    def get_model_spec(self, model):
        config = model.config
        if not hasattr(config, "rotary_pct"):
            config.rotary_pct = config.rope_parameters.get("partial_rotary_factor", 1.0)
        if not hasattr(model, "embed_out"):
            model.embed_out = model.lm_head
        return original(self, model)

    loader.get_model_spec = get_model_spec
    try:
        converter = ct2_transformers.TransformersConverter(str(hf_folder))
        converter.convert(str(output), quantization=quantization, force=True)
    finally:
        loader.get_model_spec = original
    return Path(output)
