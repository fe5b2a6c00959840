"""Convert a tiny HF folder with CTranslate2's own converter, to use ctranslate2 as an oracle."""

from __future__ import annotations

from pathlib import Path


def convert_with_ctranslate2(hf_folder: Path, output: Path, quantization: str = "float32") -> Path:
    from ctranslate2.converters import transformers as ct2_transformers

    loader = ct2_transformers.GPTNeoXLoader
    original = loader.get_model_spec

    def get_model_spec(self, model):
        # ctranslate2 4.x reads pre-transformers-5 names: restore them for its GPT-NeoX loader.
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
    return output
