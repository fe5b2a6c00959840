"""CTranslate2 folders (model.bin) read in place: against transformers and CTranslate2 itself."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kiln
from kiln.bench.ct2_convert import convert_with_ctranslate2
from kiln.conversion.formats.ctranslate2 import ModelBin

from .conftest import random_prompt, save_hf_model, tiny_gpt_neox
from .test_families import LLAMA, build

ctranslate2 = pytest.importorskip("ctranslate2")
VOCAB = 96
FAMILIES = {
    "gpt_neox": lambda: tiny_gpt_neox(seed=61),
    "llama": lambda: build("llama", dict(LLAMA), seed=62),
    "gpt2": lambda: build("gpt2", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                       n_positions=128, bos_token_id=1, eos_token_id=2), seed=63),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = FAMILIES[request.param]()
    source = save_hf_model(model, root / "hf", tokenizer_vocab=VOCAB)
    folders = {q: convert_with_ctranslate2(source, root / f"ct2-{q}", q)
               for q in ("float32", "float16", "int8")}
    return request.param, model, folders, root


def test_float32_folder_matches_transformers(family):
    _, model, folders, root = family
    generator = kiln.Generator(folders["float32"], cache_dir=root / "cache")
    assert generator.compute_type == "float32"
    prompt = random_prompt(40, VOCAB, seed=1)
    with torch.inference_mode():
        expected = model(torch.tensor([prompt])).logits
    assert (generator.forward_batch([prompt]) - expected).abs().max().item() <= 1e-4


def test_int8_folder_keeps_ctranslate2s_integers_and_scales(family):
    name, model, folders, root = family
    generator = kiln.Generator(folders["int8"], cache_dir=root / "cache",
                               compute_type="float32")  # dequantized
    stored = ModelBin([folders["int8"] / "model.bin"])
    attention = "decoder/layer_0/self_attention/linear_1/"
    integers, scale = stored.tensor(attention + "weight"), stored.tensor(attention + "weight_scale")
    dequantized = generator.model.layers[0].attn.out.weight
    assert integers.dtype == torch.int8
    assert torch.equal(dequantized, integers.float() / scale.unsqueeze(1))
    # ... and they are CTranslate2's convention applied to the original weights.
    original = {"gpt_neox": lambda m: m.gpt_neox.layers[0].attention.dense.weight,
                "llama": lambda m: m.model.layers[0].self_attn.o_proj.weight,
                "gpt2": lambda m: m.transformer.h[0].attn.c_proj.weight.t()}[name](model)
    expected_scale = 127 / original.detach().abs().amax(1)
    assert torch.allclose(scale, expected_scale)
    assert (integers.float() - torch.round(original.detach() * expected_scale[:, None])).abs().max() <= 1


def test_int8_greedy_matches_ctranslate2(family):
    """At every position of CTranslate2's own greedy output, kiln (int8) picks the same token
    from the same prefix. Teacher-forced: the two engines quantize activations differently, so
    on a random tiny model one near-tie would otherwise make all later tokens differ.

    CTranslate2's int8 tokens are a reference only where its int8 GEMM is exact, on a CPU with
    VNNI. Without VNNI (AVX2, AVX-512 without VNNI) its u8s8s32 GEMM (oneDNN's on non-Intel
    CPUs) shifts the activations to uint8 1..255 and sums pairs of uint8 * int8 products in
    saturating int16 (vpmaddubsw; oneDNN's int8 guide leaves avoiding that to the caller): on
    an AVX2 AMD EPYC its int8 logits here differ from its own exact computation by up to 4,
    and emulating that saturation reproduces them. On every CPU kiln is held to CTranslate2's
    float32 computation of the same int8 folder, which is exact everywhere."""
    import numpy as np

    from kiln.quant.kernels import _has_vnni

    _, _, folders, root = family
    generator = kiln.Generator(folders["int8"], cache_dir=root / "cache")
    assert generator.compute_type == "int8_float32"
    peer = ctranslate2.Generator(str(folders["int8"]), compute_type="int8")
    exact_peer = ctranslate2.Generator(str(folders["int8"]), compute_type="float32")
    same = same_as_exact = total = 0
    for seed in range(4):
        prompt = random_prompt(12, VOCAB, seed=seed)
        tokens = [f"t{i}" for i in prompt]
        theirs = peer.generate_batch([tokens], max_length=16, end_token=[],
                                     include_prompt_in_result=False)[0].sequences_ids[0]
        sequence = prompt + theirs
        peer_logits = np.asarray(peer.forward_batch([[f"t{i}" for i in sequence]]))[0]
        positions = slice(len(prompt) - 1, len(sequence) - 1)
        expected = peer_logits[positions].argmax(-1).tolist()
        assert expected == theirs  # CTranslate2 agrees with itself
        exact = torch.from_numpy(np.asarray(
            exact_peer.forward_batch([[f"t{i}" for i in sequence]]))[0])[:, :VOCAB]
        ours = generator.forward_batch([sequence])[0, :, :VOCAB]
        # prompts run two int8 passes: the error of the int8 weights alone
        assert ((ours - exact).norm() / exact.norm()).item() < 1e-3
        ours = ours[positions].argmax(-1).tolist()
        same += sum(a == b for a, b in zip(ours, expected, strict=True))
        same_as_exact += sum(a == b for a, b in zip(ours, exact[positions].argmax(-1).tolist(),
                                                    strict=True))
        total += len(theirs)
    assert same_as_exact / total >= 0.9
    if _has_vnni():
        assert same / total >= 0.9


def test_float16_folder_loads_and_generates(family, tmp_path):
    _, _, folders, _ = family
    output = kiln.convert(folders["float16"], tmp_path / "kiln")
    generator = kiln.Generator(output)
    assert generator.compute_type == "float16"
    result = generator.generate_batch([[5, 6, 7]], max_length=6, end_token=[],
                                      include_prompt_in_result=False)[0]
    assert len(result.sequences_ids[0]) == 6


def write_model_bin(model: ModelBin, path, version: int, extra: dict[str, torch.Tensor]) -> None:
    """Re-serialize a model.bin in an older binary version (kiln's tests' own writer)."""
    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    variables = {name: model.tensor(name) for name in model.variables} | extra
    out = [struct.pack("<I", version)]
    if version >= 2:
        out += [string(model.spec_name), struct.pack("<I", model.spec_revision)]
    out.append(struct.pack("<I", len(variables)))
    type_ids = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4}
    for name in sorted(variables):
        tensor = variables[name].contiguous()
        out += [string(name), struct.pack("<B", tensor.dim()),
                struct.pack(f"<{tensor.dim()}I", *tensor.shape)]
        if version >= 4:
            out.append(struct.pack("<BI", type_ids[tensor.dtype], tensor.nbytes))
        else:
            out.append(struct.pack("<BI", tensor.element_size(), tensor.numel()))
        out.append(tensor.numpy().tobytes())
    if version >= 3:
        out.append(struct.pack("<I", len(model.aliases)))
        out += [string(alias) + string(target) for alias, target in model.aliases.items()]
    path.write_bytes(b"".join(out))


def test_old_binary_version_with_token_strings_and_vocabulary_txt(family, tmp_path):
    name, model, folders, root = family
    if name != "gpt_neox":
        pytest.skip("one family is enough for the file format")
    old = shutil.copytree(folders["float32"], tmp_path / "old")
    stored = ModelBin([folders["float32"] / "model.bin"])  # the copy is rewritten below
    config = json.loads((old / "config.json").read_text())
    tokens = {key: torch.tensor(list(config.pop(key).encode()), dtype=torch.int8)
              for key in ("bos_token", "eos_token", "unk_token")}
    write_model_bin(stored, old / "model.bin", 5, tokens)
    (old / "config.json").write_text(json.dumps(config))
    vocabulary = json.loads((old / "vocabulary.json").read_text())
    (old / "vocabulary.json").unlink()
    (old / "vocabulary.txt").write_text("\n".join(vocabulary) + "\n")
    generator = kiln.Generator(old, cache_dir=tmp_path / "cache")
    assert generator.config.tokens.eos == [2] and generator.config.tokens.bos == 1
    prompt = random_prompt(20, VOCAB, seed=2)
    with torch.inference_mode():
        expected = model(torch.tensor([prompt])).logits
    assert (generator.forward_batch([prompt]) - expected).abs().max().item() <= 1e-4
    write_model_bin(stored, old / "model.bin", 3, tokens)  # item sizes instead of type ids
    assert torch.equal(ModelBin([old / "model.bin"]).tensor("decoder/embeddings/weight"),
                       stored.tensor("decoder/embeddings/weight"))


def test_truncated_or_corrupt_model_bin_names_file_and_offset(family, tmp_path):
    name, _, folders, _ = family
    if name != "llama":
        pytest.skip("one family is enough for the file format")
    folder = shutil.copytree(folders["float32"], tmp_path / "bad")
    data = (folder / "model.bin").read_bytes()
    (folder / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.bin is truncated or corrupt: \d+ bytes needed "
                                         r"at offset \d+"):
        kiln.convert(folder, tmp_path / "out")
    corrupt = bytearray(data)
    corrupt[0:4] = struct.pack("<I", 99)
    (folder / "model.bin").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="binary version 99"):
        kiln.convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sharded_model_bin_is_read_as_one_stream(family, tmp_path):
    name, model, folders, _ = family
    if name != "gpt2":
        pytest.skip("one family is enough for the file format")
    folder = shutil.copytree(folders["float32"], tmp_path / "sharded")
    data = (folder / "model.bin").read_bytes()
    (folder / "model.bin").unlink()
    cuts = [0, len(data) // 3 + 1, 2 * len(data) // 3 + 7, len(data)]  # tensors straddle cuts
    for i in range(3):
        (folder / f"model-{i + 1:05d}-of-00003.bin").write_bytes(data[cuts[i]:cuts[i + 1]])
    generator = kiln.Generator(folder, cache_dir=tmp_path / "cache")
    prompt = random_prompt(20, VOCAB, seed=3)
    with torch.inference_mode():
        expected = model(torch.tensor([prompt])).logits
    assert (generator.forward_batch([prompt]) - expected).abs().max().item() <= 1e-4


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_loading_a_1gb_model_bin_stays_under_1_3_gb(tmp_path):
    """CTranslate2 #1787: its loader needs twice the file. kiln maps it and gives pages back."""
    from .synthetic_model_bin import write

    folder = write(tmp_path / "ct2")
    assert (folder / "model.bin").stat().st_size > 1.0e9
    code = ("import kiln, sys; kiln.Generator(sys.argv[1], cache_dir=sys.argv[2]); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    result = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) * 1024 < 1.3e9


def test_token_strings_work_without_a_tokenizer_json(family):
    """CTranslate2 users pass token strings; the folder's vocabulary maps them."""
    name, _, folders, root = family
    if name != "llama":
        pytest.skip("one family is enough")
    generator = kiln.Generator(folders["float32"], cache_dir=root / "cache")
    peer = ctranslate2.Generator(str(folders["float32"]))
    prompt = ["t5", "t6", "t7"]
    ours = generator.generate_batch([prompt], max_length=8, end_token=[])[0]
    theirs = peer.generate_batch([prompt], max_length=8, end_token=[])[0]
    assert ours.sequences == theirs.sequences and ours.sequences_ids == theirs.sequences_ids
