"""The kiln command: convert and generate, and clear errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kiln
from kiln.cli import main

from .conftest import save_hf_model, tiny_gpt_neox


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_hf_model(tiny_gpt_neox(seed=41), tmp_path_factory.mktemp("cli") / "hf",
                         tokenizer_vocab=90)


def test_version_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "kiln", "--version"], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == f"kiln {kiln.__version__}"


def test_convert_then_generate_greedy(source, tmp_path, capsys):
    output = tmp_path / "kiln"
    assert main(["convert", str(source), str(output), "--quantization", "bfloat16"]) == 0
    assert kiln.Generator(output).compute_type == "bfloat16"
    capsys.readouterr()
    assert main(["generate", "--model", str(output), "--compute-type", "float32",
                 "--max-length", "6", "t5 t6 t7"]) == 0
    printed = capsys.readouterr().out.strip()
    expected = kiln.Generator(output, compute_type="float32").generate("t5 t6 t7", max_length=8)
    assert printed == expected
    assert len(printed.split()) == 3 + 6


def test_generate_with_sampling_and_seed_is_reproducible(source, tmp_path, capsys):
    output = kiln.convert(source, tmp_path / "kiln")
    arguments = ["generate", "--model", str(output), "--top-k", "0", "--temperature", "2",
                 "--top-p", "0.95", "--seed", "5", "--max-length", "10", "t5"]
    outputs = []
    for _ in range(2):
        assert main(arguments) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_convert_refuses_existing_output_with_exit_2(source, tmp_path, capsys):
    output = kiln.convert(source, tmp_path / "kiln")
    assert main(["convert", str(source), str(output)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert", str(source), str(output), "--force"]) == 0


def test_generate_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "hello"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("kiln generate: error: no model at") and "Traceback" not in error


def test_a_truncated_weight_file_is_one_error_line_without_traceback(source, tmp_path):
    folder = kiln.convert(source, tmp_path / "kiln")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = subprocess.run([sys.executable, "-m", "kiln", "generate", "--model", str(folder), "t5"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("kiln generate: error: ") and "truncated or corrupt" in lines[0]


def test_help_and_version_do_not_import_torch():
    code = "import sys; from kiln.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_convert_to_int4_with_a_group_size_then_generate(source, tmp_path, capsys):
    output = tmp_path / "int4"
    assert main(["convert", str(source), str(output), "--quantization", "int4",
                 "--group-size", "64"]) == 0
    config = kiln.Generator(output).config
    assert (config.weights, config.group_size) == ("int4", 64)
    capsys.readouterr()
    assert main(["generate", "--model", str(source), "--compute-type", "int4", "--group-size",
                 "32", "--cache-dir", str(tmp_path / "cache"), "--max-length", "4", "t5 t6"]) == 0
    assert len(capsys.readouterr().out.split()) == 2 + 4
    stored = list((tmp_path / "cache").rglob("int4_float32-g32/config.json"))
    assert len(stored) == 1  # the store keeps int4 conversions apart by group size
