"""Names, revisions and the converted-model cache, offline, on a fake hub cache laid out as
huggingface_hub lays out its own (models--ORG--NAME/refs/REV, snapshots/COMMIT/...)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import kiln
from kiln import conversion
from kiln.cli import main

from .conftest import random_prompt, save_hf_model, tiny_gpt_neox

REPO = "EleutherAI/pythia-tiny"
COMMITS = {"main": "a" * 40, "step3000": "b" * 40}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache with two revisions of one repo; returns (cache root, models by revision)."""
    root = tmp_path_factory.mktemp("hf-hub")
    repo = root / ("models--" + REPO.replace("/", "--"))
    models = {}
    for seed, (revision, commit) in enumerate(COMMITS.items()):
        models[revision] = tiny_gpt_neox(seed=100 + seed)
        save_hf_model(models[revision], repo / "snapshots" / commit, tokenizer_vocab=90)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    return root, models


@pytest.fixture()
def offline(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub[0]))
    return hub


def logits_of(model, prompt):
    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits


def test_names_and_revisions_load_the_right_weights(offline, tmp_path):
    _, models = offline
    prompt = random_prompt(20, 90, seed=1)
    loaded = {}
    for revision in COMMITS:
        generator = kiln.Generator.from_pretrained(
            REPO, revision=None if revision == "main" else revision, device="cpu",
            compute_type="float32", cache_dir=tmp_path)
        loaded[revision] = generator.forward_batch([prompt])
        assert (loaded[revision] - logits_of(models[revision], prompt)).abs().max() <= 1e-4
        origin = generator.config.source["origin"]
        assert origin == {"hub_id": REPO, "revision": revision, "commit": COMMITS[revision]}
    assert (loaded["main"] - loaded["step3000"]).abs().max() > 0.1


def test_second_call_is_a_cache_hit(offline, tmp_path, monkeypatch):
    first = kiln.Generator.from_pretrained(REPO, revision="step3000", device="cpu",
                                           compute_type="int8", cache_dir=tmp_path)
    assert first.compute_type == "int8_float32" and first.config.weights == "int8"

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(conversion, "convert", no_conversion)
    again = kiln.Generator.from_pretrained(REPO, revision="step3000", device="cpu",
                                           compute_type="int8", cache_dir=tmp_path)
    assert again.model_path == first.model_path


def test_auto_stores_the_type_it_runs(offline, tmp_path):
    generator = kiln.Generator.from_pretrained(REPO, cache_dir=tmp_path)  # cpu: int8_float32
    assert generator.device == "cpu" and generator.compute_type == "int8_float32"
    assert generator.model_path.name == "int8_float32"


def test_corrupt_cache_entry_is_rebuilt(offline, tmp_path):
    generator = kiln.Generator.from_pretrained(REPO, device="cpu", compute_type="float32",
                                               cache_dir=tmp_path)
    weights = generator.model_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    rebuilt = kiln.Generator.from_pretrained(REPO, device="cpu", compute_type="float32",
                                             cache_dir=tmp_path)
    assert rebuilt.model_path == generator.model_path
    assert rebuilt.forward_batch([[5, 6, 7]]).isfinite().all()


def test_unknown_revision_offline_says_what_to_do(offline, tmp_path):
    with pytest.raises(FileNotFoundError, match="not in the local hub cache"):
        kiln.Generator.from_pretrained(REPO, revision="step9", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a hub"):
        kiln.Generator.from_pretrained("no such thing", cache_dir=tmp_path)


def test_local_hf_folder_converts_once_into_the_cache(hub, tmp_path, monkeypatch):
    root, models = hub
    source = root / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMITS["main"]
    generator = kiln.Generator.from_pretrained(source, device="cpu", compute_type="float32",
                                               cache_dir=tmp_path)
    assert tmp_path in generator.model_path.parents
    monkeypatch.setattr(conversion, "convert", lambda *a, **k: pytest.fail("converted again"))
    assert kiln.Generator.from_pretrained(source, device="cpu", compute_type="float32",
                                          cache_dir=tmp_path).model_path == generator.model_path


def test_cache_ls_and_rm(offline, tmp_path, capsys):
    kiln.Generator.from_pretrained(REPO, revision="step3000", device="cpu",
                                   compute_type="float32", cache_dir=tmp_path)
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert REPO in listing and "step3000 (bbbbbbbbbb)" in listing and "float32" in listing
    assert main(["cache", "rm", "pythia-tiny", "--cache-dir", str(tmp_path)]) == 0
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    assert "no converted models" in capsys.readouterr().out
    assert main(["cache", "rm", "pythia-tiny", "--cache-dir", str(tmp_path)]) == 2


def test_kiln_convert_takes_a_hub_id_and_refuses_a_revision_for_a_local_path(offline, tmp_path):
    output = kiln.convert(REPO, tmp_path / "out", revision="step3000")
    origin = json.loads((output / "config.json").read_text())["source"]["origin"]
    assert origin == {"hub_id": REPO, "revision": "step3000", "commit": COMMITS["step3000"]}
    with pytest.raises(ValueError, match="applies to hub ids"):
        kiln.convert(output, tmp_path / "again", revision="step3000")
    assert not (tmp_path / "again").exists()


def offline_environment(hub_root, cache):
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_root),
                KILN_CACHE_DIR=str(cache))


MODEL_CARD = """
import json
from kiln.compat import GeneratorCT2fromHfHub

model_name = "EleutherAI/pythia-tiny"
model = GeneratorCT2fromHfHub(
    # load in int8 on CPU
    model_name_or_path=model_name, device="cpu", compute_type="int8",
)
outputs = model.generate(
    text=["t5 t6 t7", "t9 t10"],
    max_length=8,
)
print(json.dumps(outputs))
"""


def test_pythia_model_card_snippet_runs_with_the_compat_import(hub, tmp_path):
    result = subprocess.run([sys.executable, "-c", MODEL_CARD], capture_output=True, text=True,
                            env=offline_environment(hub[0], tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    outputs = json.loads(result.stdout)
    assert isinstance(outputs, list) and len(outputs) == 2
    assert outputs[0].startswith("t5 t6 t7 ") and outputs[1].startswith("t9 t10 ")
    assert len(outputs[0].split()) == 9  # max_length counts the prompt after its first token


def test_compat_asks_for_cuda_on_a_cpu_machine(hub, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from kiln.compat import GeneratorCT2fromHfHub

    with pytest.raises(ValueError, match="no CUDA device"):
        GeneratorCT2fromHfHub(REPO, hub_kwargs={"revision": "step3000"})


def test_cli_generate_by_name_and_revision(hub, tmp_path):
    outputs = {}
    for revision in COMMITS:
        result = subprocess.run(
            [sys.executable, "-m", "kiln", "generate", "--model", REPO, "--revision", revision,
             "--compute-type", "int8", "--max-length", "6", "t5 t6 t7"],
            capture_output=True, text=True, env=offline_environment(hub[0], tmp_path), timeout=300)
        assert result.returncode == 0, result.stderr
        outputs[revision] = result.stdout.strip()
        assert outputs[revision].startswith("t5 t6 t7")
    assert outputs["main"] != outputs["step3000"]


def test_convert_a_hub_id_at_a_revision(hub, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kiln", "convert", REPO, str(tmp_path / "out"), "--quantization",
         "int8", "--revision", "step3000"], capture_output=True, text=True,
        env=offline_environment(hub[0], tmp_path / "cache"), timeout=300)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["source"]["origin"]["commit"] == COMMITS["step3000"]
    assert config["quantization"]["weights"] == "int8"
    shutil.rmtree(tmp_path / "out")


def test_ctranslate2_repo_by_name(hub, tmp_path, monkeypatch):
    """A ct2fast-style repo (model.bin + vocabulary) resolves and loads like any other."""
    pytest.importorskip("ctranslate2")
    from huggingface_hub import constants

    from kiln.bench.ct2_convert import convert_with_ctranslate2

    root, models = hub
    source = root / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMITS["main"]
    repo = tmp_path / "hub" / "models--someone--ct2fast-pythia-tiny"
    commit = "c" * 40
    convert_with_ctranslate2(source, repo / "snapshots" / commit, "int8")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    generator = kiln.Generator("someone/ct2fast-pythia-tiny", cache_dir=tmp_path / "cache")
    assert generator.compute_type == "int8_float32"
    assert generator.config.source["format"] == "ctranslate2"
    prompt = random_prompt(20, 90, seed=5)
    expected = logits_of(models["main"], prompt)
    relative = (generator.forward_batch([prompt]) - expected).norm() / expected.norm()
    assert relative.item() < 0.05
