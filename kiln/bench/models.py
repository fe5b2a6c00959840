"""The benchmark's Hugging Face models: Pythia shapes with random weights (speed does not depend
on the values) and the real SmolLM2-135M, written as HF folders that every engine starts from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

PYTHIA_TOKENIZER_SIZE = 50277  # Pythia's tokenizer; its embedding is padded to 50304 rows
SMOLLM2 = "smollm2"


@dataclass(frozen=True)
class PythiaShape:
    """The config fields in which the Pythia sizes differ; the rest is Pythia's."""

    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int = 50304
    tokenizer_size: int = PYTHIA_TOKENIZER_SIZE
    max_positions: int = 2048

    def hf_config(self) -> dict:
        return dict(
            architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox",
            hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, intermediate_size=4 * self.hidden_size,
            vocab_size=self.vocab_size, rotary_pct=0.25, rotary_emb_base=10000,
            max_position_embeddings=self.max_positions, use_parallel_residual=True,
            layer_norm_eps=1e-5, hidden_act="gelu", bos_token_id=0, eos_token_id=0,
            tie_word_embeddings=False)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


PYTHIA_SHAPES = {
    # a toy: the engine's own costs (host time, threads, events) dominate its steps
    "tiny": PythiaShape(256, 4, 4, vocab_size=1024, tokenizer_size=1000),
    "160m": PythiaShape(768, 12, 12),
    "410m": PythiaShape(1024, 24, 16),
    "1b": PythiaShape(2048, 16, 8),
    "2.8b": PythiaShape(2560, 32, 32),
}


def write_word_level_tokenizer(folder: Path, size: int) -> None:
    """Tokens t0..t{size-1} (id = N): token strings for CTranslate2 are simply f"t{id}"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t0", "eos_token": "t0",
         "unk_token": "t0"}))


def build_pythia(shape: PythiaShape, folder: Path, seed: int = 0) -> Path:
    """Random-weight GPT-NeoX with `shape`, saved float32 as safetensors with a tokenizer.

    Built on the meta device and filled in place: transformers' own init of a 1B model is slow,
    and the values do not matter for speed.
    """
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(**shape.hf_config())
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    model = model.to_empty(device="cpu").float()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.zero_()
            elif parameter.dim() == 1:  # LayerNorm scales
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_word_level_tokenizer(folder, shape.tokenizer_size)
    return folder


def smollm2_gguf() -> Path:
    from ..sources.default_model import default_gguf

    return default_gguf()


def build_smollm2(folder: Path) -> Path:
    """SmolLM2-135M as an HF Llama folder (float32), from kiln's default GGUF file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..conversion.formats.gguf import GGUFCheckpoint

    checkpoint = GGUFCheckpoint(smollm2_gguf())
    config = LlamaConfig(**checkpoint.config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    state = {name: load() for name, load in checkpoint.tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed:
        raise ValueError(f"SmolLM2 weights do not fit LlamaForCausalLM: missing {missing}, "
                         f"unexpected {unexpected}")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    checkpoint.write_tokenizer(folder, [])
    return folder
