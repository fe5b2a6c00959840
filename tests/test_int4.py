"""int4 weights: quantization bounds and packing, the CPU kernel against the exact reference
(dequantize, then matmul) for shapes it tiles and odd ones it is padded for, int4 folders
(conversion, loading, quantizing at load, corrupt files), GGUF 4-bit blocks imported natively
against gguf's own dequantization, and faithfulness on small trained models."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

import kiln
from kiln.errors import ModelFileError
from kiln.model.loading import check_folder, read_weights
from kiln.quant import int4
from kiln.quant.int4 import (
    GroupWeight,
    Int4Linear,
    dequantize_groups,
    pack_nibbles,
    quantize_groups,
    unpack_nibbles,
)
from kiln.storage.safetensors_mmap import MappedSafetensors

from .conftest import save_hf_model
from .test_gguf import llama_cpp_permute, tiny_llama, write_gguf


def weight(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ quantization and packing

@pytest.mark.parametrize("columns, group", [(256, 128), (256, 32), (100, 64), (33, 32)])
def test_dequantized_weight_is_within_half_a_step_per_group(columns, group):
    w = weight(12, columns)
    q = quantize_groups(w, group)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (12, (columns + 1) // 2)
    assert q.scales.dtype == q.minimums.dtype == torch.float16
    assert q.scales.shape == (12, -(-columns // group))
    restored = q.dequantize()
    step = q.scales.float()[:, torch.arange(columns) // group]
    # half a step from rounding, plus what the float16 minimum loses
    assert ((restored - w).abs() <= step / 2 + 2e-3).all()
    assert (restored - w).abs().max() > 0  # really quantized


def test_constant_groups_do_not_divide_by_zero():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    assert torch.equal(quantize_groups(w, 32).dequantize(), w)


def test_nibbles_round_trip_for_odd_lengths():
    values = torch.randint(0, 16, (3, 7), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(values), 7), values)
    assert pack_nibbles(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21  # low first


def test_group_size_is_checked():
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_groups(weight(4, 64), 48)


def test_stacked_and_permuted_groups_equal_the_same_float_operations():
    a, b = quantize_groups(weight(8, 64, 1), 32), quantize_groups(weight(4, 64, 2), 32)
    stacked = GroupWeight.cat([a, b])
    assert torch.equal(stacked.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    order = torch.randperm(12)
    assert torch.equal(stacked.rows(order).dequantize(), stacked.dequantize()[order])


# ------------------------------------------------------------------ the linear layer

def close_to_reference(got: torch.Tensor, expected: torch.Tensor) -> bool:
    # the kernels take bfloat16 activations: within bfloat16 rounding of the exact result
    return (got - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()


@pytest.mark.parametrize("rows, columns, group", [
    (64, 256, 32), (64, 256, 64), (64, 256, 128),  # shapes the kernel tiles as they are
    (960, 576, 128),  # SmolLM2's qkv: 576 columns are 4.5 groups of 128
    (10, 100, 64),  # neither rows nor columns fit: both padded
    (24, 33, 32),  # an odd column count: the last byte holds one value
])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_kernel_matches_the_reference(rows, columns, group, bias):
    w = weight(rows, columns, seed=group)
    b = torch.randn(rows) if bias else None
    layer = Int4Linear.from_float(w, b, group_size=group)
    assert layer.uses_kernel == int4.cpu_kernel_available()
    x = torch.randn(5, 3, columns)
    expected = F.linear(x, layer.dequantized(), b)
    got = layer(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    assert close_to_reference(got, expected)


@pytest.mark.parametrize("bias", [False, True])
def test_without_a_kernel_the_reference_path_is_exact(monkeypatch, bias):
    monkeypatch.setattr(int4, "cpu_kernel_available", lambda: False)
    w = weight(24, 100, seed=1)
    layer = Int4Linear.from_float(w, torch.randn(24) if bias else None, group_size=64)
    assert not layer.uses_kernel
    x = torch.randn(4, 100)
    assert torch.equal(layer(x), F.linear(x, layer.dequantized(), layer.bias))


def test_dropping_the_stored_form_keeps_the_kernel_and_explains_itself():
    layer = Int4Linear.from_float(weight(32, 64), group_size=32)
    if not layer.uses_kernel:
        pytest.skip("no int4 CPU kernel in this PyTorch")
    x = torch.randn(2, 64)
    before = layer(x)
    layer.drop_stored()
    assert torch.equal(layer(x), before)
    with pytest.raises(RuntimeError, match="freed after packing"):
        layer.dequantized()


# ------------------------------------------------------------------ folders

VOCAB = 64


def progressions(rows: int, length: int, seed: int) -> torch.Tensor:
    """Arithmetic progressions of token ids (mod the vocabulary): a task a tiny model learns
    in seconds, so its predictions are confident like a trained model's."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(3, VOCAB, (rows, 1), generator=generator)
    step = torch.randint(1, 7, (rows, 1), generator=generator)
    return 3 + (start - 3 + step * torch.arange(length)) % (VOCAB - 3)


def trained(model, steps: int = 250):
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        ids = progressions(32, 32, seed=step)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def trained_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return trained(GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, rotary_pct=0.25, max_position_embeddings=128)))


def trained_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return trained(LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True)))


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def trained_pair(request, tmp_path_factory):
    """(trained transformers model, its HF folder, its float32 kiln folder)."""
    root = tmp_path_factory.mktemp(f"int4-{request.param}")
    model = trained_neox() if request.param == "gpt_neox" else trained_llama()
    source = save_hf_model(model, root / "hf", tokenizer_vocab=VOCAB)
    return model, source, kiln.convert(source, root / "float32")


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_teacher_forced_tokens_match_float32(trained_pair, tmp_path, group_size):
    model, source, _ = trained_pair
    folder = kiln.convert(source, tmp_path / "int4", quantization="int4", group_size=group_size)
    generator = kiln.Generator(folder)
    assert generator.compute_type == "int4_float32"
    ids = progressions(4, 48, seed=1000)  # held out: seeds below 250 trained the model
    with torch.inference_mode():
        expected = model(ids).logits.argmax(-1)
    got = generator.forward_batch(ids.tolist()).argmax(-1)
    assert (got == expected).float().mean().item() >= 0.9
    # and it generates: the greedy continuation of a progression is the float32 one
    prompt = ids[0, :16].tolist()
    with torch.inference_mode():
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, 16:].tolist()
    result = generator.generate_batch([prompt], max_length=8, end_token=[],
                                      include_prompt_in_result=False)
    assert sum(a == b for a, b in zip(result[0].sequences_ids[0], reference, strict=True)) >= 7


def test_int4_folder_layout_and_quantizing_at_load_agree(trained_pair, tmp_path):
    _, source, float_folder = trained_pair
    folder = kiln.convert(source, tmp_path / "int4", quantization="int4", group_size=64)
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == 2
    assert config["quantization"] == {"dtype": "float32", "weights": "int4", "group_size": 64}
    assert json.loads((float_folder / "config.json").read_text())["format_version"] == 1
    tensors, _ = read_weights(folder, check_folder(folder))
    assert tensors["layers.0.attn.qkv.weight"].dtype == torch.uint8
    assert tensors["layers.0.attn.qkv.weight_scales"].dtype == torch.float16
    assert tensors["embed.weight"].dtype == torch.int8  # the embedding stays int8
    stored = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    floats = sum(path.stat().st_size for path in float_folder.glob("*.safetensors"))
    assert stored < 0.3 * floats

    ids = progressions(2, 24, seed=2000).tolist()
    from_folder = kiln.Generator(folder).forward_batch(ids)
    at_load = kiln.Generator(float_folder, compute_type="int4", group_size=64)
    assert torch.equal(at_load.forward_batch(ids), from_folder)  # same groups, same numbers
    # an int4 folder also loads as float32 and int8 (dequantized, then requantized)
    for compute_type in ("float32", "int8"):
        other = kiln.Generator(folder, compute_type=compute_type).forward_batch(ids)
        assert (other.argmax(-1) == from_folder.argmax(-1)).float().mean() >= 0.9


def test_group_size_options_are_checked(trained_pair, tmp_path):
    _, source, float_folder = trained_pair
    with pytest.raises(ValueError, match="group_size applies to int4"):
        kiln.convert(source, tmp_path / "out", quantization="int8", group_size=64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        kiln.convert(source, tmp_path / "out", quantization="int4", group_size=100)
    with pytest.raises(ValueError, match="group_size applies to int4"):
        kiln.Generator(float_folder, compute_type="int8", group_size=32)
    assert not (tmp_path / "out").exists()


def rewrite_tensor(folder, name, tensor) -> None:
    """Replace one tensor of a kiln folder's weights (and its recorded size)."""
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    mapped = MappedSafetensors(path)
    tensors = {key: mapped.tensor(key).clone() for key in mapped.keys()}
    del mapped
    tensors[name] = tensor
    save_file(tensors, str(path))
    config = json.loads((folder / "config.json").read_text())
    config["files"]["model.safetensors"]["bytes"] = path.stat().st_size
    (folder / "config.json").write_text(json.dumps(config))


UP = "layers.0.mlp.up.weight"


@pytest.mark.parametrize("name, damage, message", [
    (UP, lambda t: t.view(torch.int8), "is torch.int8"),
    (UP, lambda t: t[:, :-1].contiguous(), "has shape"),
    (f"{UP}_scales", lambda t: t.float(), "is torch.float32"),
    (f"{UP}_mins", lambda t: t[:-1].contiguous(), "has shape"),
])
def test_corrupt_packed_tensors_are_model_file_errors(trained_pair, tmp_path, name, damage,
                                                      message):
    _, source, _ = trained_pair
    folder = kiln.convert(source, tmp_path / "int4", quantization="int4")
    tensors, _ = read_weights(folder, check_folder(folder))
    damaged = damage(tensors[name].clone())
    del tensors
    rewrite_tensor(folder, name, damaged)
    with pytest.raises(ModelFileError, match=message):
        kiln.Generator(folder)


def test_a_bad_group_size_in_config_is_a_model_file_error(trained_pair, tmp_path):
    _, source, _ = trained_pair
    folder = kiln.convert(source, tmp_path / "int4", quantization="int4")
    config = json.loads((folder / "config.json").read_text())
    config["quantization"]["group_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="group_size"):
        kiln.Generator(folder)


# ------------------------------------------------------------------ GGUF 4-bit blocks

def k_blocks(rows: int, columns: int, seed: int) -> np.ndarray:
    """Random Q4_K blocks (gguf cannot write them) with weight-sized scales: d and dmin in
    [1e-3, 1e-2], random 6-bit sub-block scales and minimums, random nibbles."""
    block, size = gguf.GGML_QUANT_SIZES[Q.Q4_K]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * columns // block, size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (blocks.shape[0], 2)).astype(np.float16)
    blocks[:, :4] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_gguf_4bit_blocks_import_natively(tmp_path, monkeypatch, kind):
    model = tiny_llama(num_hidden_layers=1)
    config = model.config
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    projections = {"attn_q": ("self_attn.q_proj", config.num_attention_heads),
                   "attn_k": ("self_attn.k_proj", config.num_key_value_heads),
                   "attn_v": ("self_attn.v_proj", None), "ffn_gate": ("mlp.gate_proj", None),
                   "ffn_up": ("mlp.up_proj", None), "attn_output": ("self_attn.o_proj", None)}
    if kind != Q.Q4_K:  # 96 input columns: not whole 256-weight K blocks
        projections["ffn_down"] = ("mlp.down_proj", None)
    encodings = {}
    for index, (name, (hf_name, heads)) in enumerate(projections.items()):
        w = state[f"model.layers.0.{hf_name}.weight"]
        w = llama_cpp_permute(w, heads) if heads else w
        raw = (k_blocks(*w.shape, seed=index) if kind == Q.Q4_K
               else gguf.quants.quantize(np.ascontiguousarray(w), kind))
        encodings[f"blk.0.{name}.weight"] = (raw, kind)
    path = write_gguf(tmp_path / f"{kind.name}.gguf", model, encodings=encodings)

    native = kiln.convert(path, tmp_path / "int4", quantization="int4")  # groups of 32
    through_float = kiln.convert(path, tmp_path / "float32")
    int4_tensors, _ = read_weights(native, check_folder(native))
    float_tensors, _ = read_weights(through_float, check_folder(through_float))
    for name in ("layers.0.attn.qkv.weight", "layers.0.mlp.up.weight"):
        restored = dequantize_groups(int4_tensors[name], int4_tensors[f"{name}_scales"],
                                     int4_tensors[f"{name}_mins"], 256, 32)
        reference = float_tensors[name]  # gguf's own dequantization, un-permuted
        if kind == Q.Q4_K:  # a sub-block scale d * sc is rounded to float16
            assert (restored - reference).abs().max() <= 1e-3 * reference.abs().max()
        else:  # exact, but for Q4_0's w = q*d - 8d against gguf's d*(q - 8): one rounding
            assert torch.allclose(restored, reference, rtol=1e-6, atol=1e-7)
    # the 4-bit values themselves came through: requantizing from float would not know them
    qkv = int4_tensors["layers.0.attn.qkv.weight_scales"]
    assert qkv.shape == (config.hidden_size // config.num_attention_heads
                         * (config.num_attention_heads + 2 * config.num_key_value_heads), 8)
    # The native folder runs the file's weights: on the exact path, its logits are those of
    # the same folder dequantized to float32 (int8 embedding and head included). The int8
    # head runs weight-only here: its kernels quantize activations, on a grid that depends on
    # the CPU (kernels.py), and test_int8 holds them to their own bounds.
    ids = [[5, 9, 14, 20, 7, 3]]
    dequantized = kiln.Generator(native, compute_type="float32").forward_batch(ids)
    monkeypatch.setattr(int4, "cpu_kernel_available", lambda: False)
    exact = kiln.Generator(native, int8_backend=None).forward_batch(ids)
    assert (exact - dequantized).abs().max() <= 1e-5 * dequantized.abs().max()  # float32 both


def test_default_model_runs_from_its_own_4bit_weights(default_model_cache):
    """SmolLM2's file is Q4_1 (blocks of 32): as int4 it keeps those weights exactly, and
    loses almost nothing against float32 (the kernel's bfloat16 activations)."""
    from kiln.perplexity import perplexity
    from kiln.sources.default_model import default_model_path

    folder = default_model_path(default_model_cache, 32)
    config = check_folder(folder)
    assert config.weights == "int4" and config.group_size == 32
    text = (__import__("pathlib").Path(__file__).parent / "data" / "GPL-3").read_text()
    int4_generator = kiln.Generator(compute_type="int4", cache_dir=default_model_cache)
    assert int4_generator.model_path == folder
    float_generator = kiln.Generator(cache_dir=default_model_cache, compute_type="float32")
    float_ppl = perplexity(float_generator, text, 512).perplexity
    int4_ppl = perplexity(int4_generator, text, 512).perplexity
    assert abs(int4_ppl / float_ppl - 1) < 0.01
