"""Conversion: checkpoint formats, the folder written, atomicity, refusal to overwrite."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

import kiln

from .conftest import random_prompt, save_hf_model, tiny_gpt_neox

# The module (the kiln.conversion package exports its `convert` function under the same name).
conversion = importlib.import_module("kiln.conversion.convert")


@pytest.fixture(scope="module")
def model():
    return tiny_gpt_neox(seed=21)


def reference_logits(model, prompt):
    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits


def save_bin_checkpoint(model, folder, shards: int) -> None:
    """The pre-safetensors layout (transformers 5 no longer writes it): torch.save shards."""
    model.config.save_pretrained(folder)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = sorted(state)
    weight_map = {}
    for shard in range(shards):
        file = f"pytorch_model-{shard + 1:05d}-of-{shards:05d}.bin"
        part = {name: state[name] for name in names[shard::shards]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
def test_checkpoint_layouts_convert_identically(model, tmp_path, layout):
    source = tmp_path / "hf"
    source.mkdir()
    if layout == "sharded-safetensors":
        model.save_pretrained(source, max_shard_size="40KB")
        assert (source / "model.safetensors.index.json").is_file()
    elif layout == "safetensors":
        save_hf_model(model, source)
    else:
        save_bin_checkpoint(model, source, shards=3 if layout == "sharded-bin" else 1)
    generator = kiln.Generator(kiln.convert(source, tmp_path / "kiln"))
    prompt = random_prompt(20, 96, seed=1)
    assert (generator.forward_batch([prompt]) - reference_logits(model, prompt)).abs().max() <= 1e-4


def test_output_folder_contents(model, tmp_path):
    source = save_hf_model(model, tmp_path / "hf", tokenizer_vocab=90)
    output = kiln.convert(source, tmp_path / "kiln", quantization="float16")
    names = sorted(path.name for path in output.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((output / "config.json").read_text())
    assert config["format"] == "kiln" and config["format_version"] == 1
    assert config["quantization"]["dtype"] == "float16"
    assert config["model"]["tokenizer_vocab_size"] == 90
    assert config["model"]["rotary_dim"] == 4 and config["model"]["parallel_residual"] is True
    assert config["tokens"]["eos"] == [2]
    info = config["files"]["model.safetensors"]
    assert info["bytes"] == (output / "model.safetensors").stat().st_size
    assert len(info["sha256"]) == 64


def test_large_models_are_written_in_shards(model, tmp_path):
    source = save_hf_model(model, tmp_path / "hf")
    output = kiln.convert(source, tmp_path / "kiln", max_shard_bytes=60_000)
    shards = sorted(path.name for path in output.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    generator = kiln.Generator(output)
    prompt = random_prompt(10, 96, seed=2)
    assert (generator.forward_batch([prompt]) - reference_logits(model, prompt)).abs().max() <= 1e-4


def test_copy_files(model, tmp_path):
    source = save_hf_model(model, tmp_path / "hf")
    (source / "README.md").write_text("card")
    output = kiln.convert(source, tmp_path / "kiln", copy_files=["README.md"])
    assert (output / "README.md").read_text() == "card"
    with pytest.raises(FileNotFoundError, match="LICENSE"):
        kiln.convert(source, tmp_path / "other", copy_files=["LICENSE"])


def test_existing_output_is_refused_unless_force(model, tmp_path):
    source = save_hf_model(model, tmp_path / "hf")
    output = kiln.convert(source, tmp_path / "kiln")
    with pytest.raises(FileExistsError, match="force"):
        kiln.convert(source, output, quantization="bfloat16")
    assert json.loads((output / "config.json").read_text())["quantization"]["dtype"] == "float32"
    kiln.convert(source, output, quantization="bfloat16", force=True)
    assert json.loads((output / "config.json").read_text())["quantization"]["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_conversion_leaves_nothing_that_loads(model, tmp_path, monkeypatch):
    source = save_hf_model(model, tmp_path / "hf")
    output = tmp_path / "kiln"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion.KilnConfig, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kiln.convert(source, output)
    assert not output.exists()
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_interrupted_forced_conversion_keeps_the_old_folder(model, tmp_path, monkeypatch):
    source = save_hf_model(model, tmp_path / "hf")
    output = kiln.convert(source, tmp_path / "kiln")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion, "_write_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kiln.convert(source, output, force=True)
    kiln.Generator(output)  # still the complete old model


def _private_bytes() -> int:
    """Anonymous (private) resident memory: mapped weights the model has read are resident
    too, but as pages of the file, shared and given back under pressure, not counted here."""
    with open("/proc/self/status") as handle:
        return int(handle.read().split("RssAnon:")[1].split()[0]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_loading_maps_weights_instead_of_copying(tmp_path):
    """Loading float32 weights in float32 must not read them into private memory (the
    engine runs the model once when it starts, to capture its decode step: that reads the
    mapped pages, which must stay pages of the file)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=6,
                           num_attention_heads=8, intermediate_size=2048)
    source = save_hf_model(GPTNeoXForCausalLM(config), tmp_path / "hf")
    output = kiln.convert(source, tmp_path / "kiln")
    size = (output / "model.safetensors").stat().st_size
    before = _private_bytes()
    generator = kiln.Generator(output)
    grown = _private_bytes() - before
    assert size > 80e6 and grown < 0.25 * size, (grown, size)
    assert generator.forward_batch([[1, 2, 3]]).isfinite().all()
