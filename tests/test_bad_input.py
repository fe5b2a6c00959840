"""Every bad input gets a clear error naming the problem and what is accepted, before compute."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import kiln

from .conftest import save_hf_model, tiny_gpt_neox


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    source = save_hf_model(tiny_gpt_neox(seed=31), root / "hf", tokenizer_vocab=90)
    return source, kiln.convert(source, root / "kiln")


@pytest.fixture(scope="module")
def generator(folders):
    return kiln.Generator(folders[1])


def copy_folder(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


# ------------------------------------------------------------------ loading


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        kiln.Generator(tmp_path / "nowhere")


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a model: expected a kiln folder, a "
                                                "Hugging Face checkpoint folder"):
        kiln.Generator(tmp_path)


def test_hf_folder_is_converted_once_into_the_cache(folders, tmp_path):
    generator = kiln.Generator(folders[0], cache_dir=tmp_path)
    assert tmp_path in generator.model_path.parents
    assert torch.equal(generator.forward_batch([[5, 6, 7]]),
                       kiln.Generator(folders[1]).forward_batch([[5, 6, 7]]))


def test_missing_weight_file(folders, tmp_path):
    folder = copy_folder(folders[1], tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        kiln.Generator(folder)


def test_truncated_weight_file(folders, tmp_path):
    folder = copy_folder(folders[1], tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        kiln.Generator(folder)


def test_corrupt_weight_file_fails_its_checksum(folders, tmp_path):
    folder = copy_folder(folders[1], tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        kiln.Generator(folder, verify_checksums=True)


def test_corrupt_header_names_the_file(folders, tmp_path):
    folder = copy_folder(folders[1], tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors"):
        kiln.Generator(folder)


def test_newer_format_version_says_upgrade(folders, tmp_path):
    folder = copy_folder(folders[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="upgrade kiln"):
        kiln.Generator(folder)


def test_unknown_compute_type_lists_valid_ones(folders):
    with pytest.raises(ValueError, match="float32.*bfloat16"):
        kiln.Generator(folders[1], compute_type="float8")


def test_unknown_device_lists_valid_ones(folders):
    with pytest.raises(ValueError, match="cpu, cuda, auto"):
        kiln.Generator(folders[1], device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu(folders):
    with pytest.raises(ValueError, match="no CUDA device"):
        kiln.Generator(folders[1], device="cuda")


# ------------------------------------------------------------------ converting


def test_unsupported_model_type_lists_supported(folders, tmp_path):
    source = shutil.copytree(folders[0], tmp_path / "hf")
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "mamba"
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'mamba' is not supported.*gpt_neox"):
        kiln.convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        kiln.convert(tmp_path / "nowhere", tmp_path / "out")


def test_convert_folder_without_weights(folders, tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    shutil.copy(folders[0] / "config.json", source)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        kiln.convert(source, tmp_path / "out")


def test_convert_unknown_quantization(folders, tmp_path):
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        kiln.convert(folders[0], tmp_path / "out", quantization="int3")


def test_convert_weights_that_disagree_with_config(folders, tmp_path):
    source = shutil.copytree(folders[0], tmp_path / "hf")
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 100
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="disagree"):
        kiln.convert(source, tmp_path / "out")


# ------------------------------------------------------------------ generating


def test_empty_batch(generator):
    with pytest.raises(ValueError, match="batch is empty"):
        generator.generate_batch([])
    with pytest.raises(ValueError, match="batch is empty"):
        generator.generate([])


def test_empty_prompt(generator):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generator.generate_batch([[5, 6], []])
    with pytest.raises(ValueError, match="empty"):
        generator.generate("")


def test_token_ids_out_of_range(generator):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 96\): \[96\]"):
        generator.generate_batch([[5, 96]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generator.generate_batch([[-1]])


def test_unknown_token_strings(generator):
    with pytest.raises(ValueError, match="not in the vocabulary: \\['nope'\\]"):
        generator.generate_batch([["t5", "nope"]])


@pytest.mark.parametrize("max_length", [0, -3])
def test_max_length_not_positive(generator, max_length):
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        generator.generate_batch([[5, 6]], max_length=max_length)


def test_max_length_smaller_than_the_counted_prompt(generator):
    with pytest.raises(ValueError, match="include_prompt_in_result=False"):
        generator.generate_batch([[5, 6, 7, 8]], max_length=3)


def test_prompt_plus_new_tokens_beyond_context(generator):
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        generator.generate_batch([[5] * 100], max_length=40, include_prompt_in_result=False)
    with pytest.raises(ValueError, match="context"):
        generator.forward_batch([[5] * 129])


@pytest.mark.parametrize("option, value, message", [
    ("sampling_temperature", -0.5, "sampling_temperature must be >= 0"),
    ("sampling_topp", 0.0, r"sampling_topp must be in \(0, 1\]"),
    ("sampling_topp", 1.5, r"sampling_topp must be in \(0, 1\]"),
    ("sampling_topk", -1, "sampling_topk must be an int >= 0"),
    ("min_length", -1, "min_length must be an int >= 0"),
    ("max_batch_size", -2, "max_batch_size must be an int >= 0"),
])
def test_bad_sampling_values(generator, option, value, message):
    with pytest.raises(ValueError, match=message):
        generator.generate_batch([[5, 6]], **{option: value})


def test_bad_end_token(generator):
    with pytest.raises(ValueError, match="end_token"):
        generator.generate_batch([[5, 6]], end_token=500)


def test_lone_surrogate_in_text(generator):
    with pytest.raises(ValueError, match="lone surrogate"):
        generator.generate("t5 \ud800 t6")


def test_prompt_of_wrong_type(generator):
    with pytest.raises(TypeError, match="list of prompts"):
        generator.generate_batch("t5 t6")
    with pytest.raises(TypeError, match="all token strings or all ints"):
        generator.generate_batch([["t5", 6]])


def test_generator_still_works_after_bad_input(generator):
    with pytest.raises(ValueError):
        generator.generate_batch([[5, 96]])
    assert len(generator.generate_batch([[5, 6]], max_length=4)[0].sequences_ids[0]) >= 2


def test_out_of_memory_says_what_to_reduce_and_leaves_the_generator_usable(folders, generator,
                                                                             monkeypatch):
    from kiln.generation import slots

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(slots, "KVCache", exhausted)  # the KV cache, allocated at start
    with pytest.raises(MemoryError, match=r"4 slots x \d+ positions need .* GiB.*max_batch_size"):
        kiln.Generator(folders[1], max_batch_size=4)
    monkeypatch.undo()
    monkeypatch.setattr(type(generator.model), "forward", exhausted)  # a step's activations
    monkeypatch.setattr(type(generator.model), "prefill", exhausted)
    with pytest.raises(MemoryError, match="lower max_prefill_tokens_per_step or max_batch_size"):
        generator.generate_batch([[5, 6]] * 4, max_length=100)
    monkeypatch.undo()
    assert len(generator.generate_batch([[5, 6]], max_length=4)[0].sequences_ids[0]) >= 2


def test_bad_options_fail_before_any_conversion(folders, tmp_path):
    """An HF folder would be converted into the cache: a bad option must stop that first."""
    for options, message in ((dict(device="tpu"), "unknown device"),
                             (dict(compute_type="int3"), "unknown compute_type"),
                             (dict(int8_backend="magic"), "unknown int8 backend")):
        with pytest.raises(ValueError, match=message):
            kiln.Generator(folders[0], cache_dir=tmp_path, **options)
    assert not (tmp_path / "models").exists()
