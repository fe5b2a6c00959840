"""Integer weights: CTranslate2's per-row convention, every compute type, faithfulness."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import kiln
from kiln.model.kv_cache import KVCache
from kiln.quant import kernels
from kiln.quant.compute_types import NAMED
from kiln.quant.int8 import QuantizedLinear, dequantize_rows, quantize_rows

from .conftest import random_prompt, save_hf_model, tiny_gpt_neox
from .test_families import LLAMA, build

VOCAB = 90


@pytest.mark.parametrize("bits, qmax", [("int8", 127), ("int16", 32767)])
def test_round_trip_error_is_within_half_a_step_per_row(bits, qmax):
    torch.manual_seed(0)
    weight = torch.randn(64, 200) * torch.logspace(-3, 1, 64).unsqueeze(1)
    weight[7] = 0.0  # an all-zero row must not divide by zero
    integers, scale = quantize_rows(weight, bits)
    assert integers.dtype == getattr(torch, bits) and scale.dtype == torch.float32
    row_max = weight.abs().amax(1)
    nonzero = row_max > 0
    assert torch.allclose(scale[nonzero], qmax / row_max[nonzero])  # CTranslate2's convention
    assert integers.abs().amax(1)[nonzero].eq(qmax).all()  # each row uses its full range
    error = (dequantize_rows(integers, scale) - weight).abs().amax(1)
    assert (error <= 0.5 / scale + 1e-6 * row_max).all()
    assert dequantize_rows(integers, scale)[7].eq(0).all()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    model = tiny_gpt_neox(seed=51, num_hidden_layers=3)
    source = save_hf_model(model, root / "hf", tokenizer_vocab=VOCAB)
    return model, source, kiln.convert(source, root / "float32")


@pytest.mark.parametrize("compute_type", NAMED)
def test_every_compute_type_loads_and_generates(folders, compute_type):
    _, _, float_folder = folders
    generator = kiln.Generator(float_folder, compute_type=compute_type)
    expected = {"int8": "int8_float32", "int4": "int4_float32"}.get(compute_type, compute_type)
    assert generator.compute_type == expected
    tokens = generator.generate_batch([random_prompt(20, VOCAB, 1)], max_length=8, end_token=[],
                                      include_prompt_in_result=False)[0].sequences_ids[0]
    assert len(tokens) == 8 and max(tokens) < VOCAB


@pytest.mark.parametrize("quantization", ["int8", "int8_float16", "int8_bfloat16", "int16"])
def test_integer_folders_convert_load_and_default_to_their_type(folders, tmp_path, quantization):
    _, source, _ = folders
    folder = kiln.convert(source, tmp_path / quantization, quantization=quantization)
    config = json.loads((folder / "config.json").read_text())["quantization"]
    assert config["weights"] == ("int16" if quantization == "int16" else "int8")
    generator = kiln.Generator(folder)
    assert generator.compute_type == {"int8": "int8_float32"}.get(quantization, quantization)
    assert generator.generate("t5 t6 t7", max_length=6).startswith("t5 t6 t7")


def test_int8_folder_is_at_most_27_percent_of_float32(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=4,
                           num_attention_heads=4, intermediate_size=1024)
    source = save_hf_model(GPTNeoXForCausalLM(config), tmp_path / "hf")
    sizes = {q: (kiln.convert(source, tmp_path / q, quantization=q) / "model.safetensors").stat().st_size
             for q in ("float32", "int8")}
    assert sizes["int8"] <= 0.27 * sizes["float32"]


def logits(generator, prompt):
    return generator.forward_batch([prompt])[0]


def test_quantizing_at_load_equals_quantizing_at_conversion(folders, tmp_path):
    _, source, float_folder = folders
    prompt = random_prompt(30, VOCAB, 2)
    at_load = logits(kiln.Generator(float_folder, compute_type="int8"), prompt)
    converted = logits(kiln.Generator(kiln.convert(source, tmp_path / "q", quantization="int8")), prompt)
    assert torch.equal(at_load, converted)


def test_int8_folder_with_a_float_type_dequantizes(folders, tmp_path):
    _, source, _ = folders
    folder = kiln.convert(source, tmp_path / "q", quantization="int8")
    generator = kiln.Generator(folder, compute_type="float32")
    assert generator.compute_type == "float32"
    qkv = generator.model.layers[0].attn.qkv.weight
    assert qkv.dtype == torch.float32
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        stored = handle.get_tensor("layers.0.attn.qkv.weight")
        scale = handle.get_tensor("layers.0.attn.qkv.weight_scale")
    assert torch.equal(qkv, stored.float() / scale.unsqueeze(1))


def test_prefill_is_as_accurate_as_weight_only_int8(folders, tmp_path):
    """Prompts (many rows) run two int8 passes: ~16-bit activations, the error of the weights."""
    _, source, _ = folders
    # A float32 KV cache for both: what is compared is the activations' quantization.
    int8 = kiln.Generator(kiln.convert(source, tmp_path / "q", quantization="int8"),
                          kv_cache_dtype="float32")
    weight_only = kiln.Generator(int8.model_path, compute_type="float32")  # same int8 weights
    prompt = random_prompt(40, VOCAB, 3)
    expected, actual = logits(weight_only, prompt), logits(int8, prompt)
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-3


def stepwise_logits(generator, ids: list[int]) -> torch.Tensor:
    """Logits after each prefix, one token per decode step (one 8-bit int8 pass)."""
    cache = KVCache(generator.spec, 1, len(ids), generator.dtype, "cpu")
    steps = []
    with torch.inference_mode():
        for position, token in enumerate(ids):
            step = generator.model(torch.tensor([[token]]), torch.tensor([[position]]), cache,
                                   kv_length=position + 1, decode=True)
            steps.append(step[0, -1, :generator.spec.usable_vocab_size])
    return torch.stack(steps)


def stepwise_argmax(generator, ids: list[int]) -> list[int]:
    """Greedy choice after each prefix, one token per decode step (one 8-bit int8 pass)."""
    return stepwise_logits(generator, ids).argmax(-1).tolist()


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_int8_greedy_agrees_with_float32(tmp_path, family):
    """At each of 64 generated positions, given the same prefix, int8 picks float32's token.

    Teacher-forced: a random tiny model has many near-ties, so one early flip would make
    free-running sequences differ everywhere after it without saying much about int8.
    """
    if family == "gpt_neox":
        model = tiny_gpt_neox(seed=52)
    else:
        model = build("llama", dict(LLAMA), seed=52)
    source = save_hf_model(model, tmp_path / "hf", tokenizer_vocab=96)
    reference = kiln.Generator(kiln.convert(source, tmp_path / "f32"))
    quantized = kiln.Generator(reference.model_path, compute_type="int8")
    decode_same = prefill_same = 0
    for seed in range(4):
        prompt = random_prompt(16, 96, seed)
        generated = reference.generate_batch([prompt], max_length=64, end_token=[],
                                             include_prompt_in_result=False)[0].sequences_ids[0]
        sequence = prompt + generated
        positions = slice(len(prompt) - 1, len(sequence) - 1)  # predictions of the 64 tokens
        expected = stepwise_argmax(reference, sequence)[positions]
        decode_same += sum(a == b for a, b in zip(
            expected, stepwise_argmax(quantized, sequence)[positions], strict=True))
        prefill = quantized.forward_batch([sequence])[0, positions, :96].argmax(-1).tolist()
        prefill_same += sum(a == b for a, b in zip(expected, prefill, strict=True))
    assert decode_same / 256 >= 0.9 and prefill_same / 256 >= 0.9


def test_backends_agree_and_the_fallback_works(folders, monkeypatch):
    _, _, float_folder = folders
    prompt = random_prompt(30, VOCAB, 4)
    # A float32 KV cache: bfloat16 would round the kernels' last-bit differences up to 1e-3.
    fbgemm = kiln.Generator(float_folder, compute_type="int8", int8_backend="fbgemm",
                            kv_cache_dtype="float32")
    int_mm = kiln.Generator(float_folder, compute_type="int8", int8_backend="int_mm",
                            kv_cache_dtype="float32")
    assert isinstance(fbgemm.model.layers[0].attn.qkv.kernel, kernels.FbgemmKernel)
    assert (fbgemm.int8_backend, int_mm.int8_backend) == ("fbgemm", "int_mm")
    assert isinstance(int_mm.model.layers[0].attn.qkv.kernel, kernels.IntMMKernel)
    # Prompts run two passes on the kernel's grid: 1/127, but 1/63 for fbgemm on a CPU without
    # VNNI (kernels.py). On one grid the backends multiply the same integers, so int_mm is
    # compared on fbgemm's grid: the same on every CPU, whatever its instruction set.
    with monkeypatch.context() as patch:
        patch.setattr(kernels.IntMMKernel, "levels", kernels.FbgemmKernel.levels)
        same_grid = logits(kiln.Generator(float_folder, compute_type="int8",
                                          int8_backend="int_mm", kv_cache_dtype="float32"), prompt)
    assert torch.allclose(logits(fbgemm, prompt), same_grid, atol=1e-3)
    options = dict(max_length=16, end_token=[], include_prompt_in_result=False)
    assert fbgemm.generate_batch([prompt], **options)[0].sequences_ids == \
        int_mm.generate_batch([prompt], **options)[0].sequences_ids
    if kernels.onednn_available():
        onednn = kiln.Generator(float_folder, compute_type="int8", int8_backend="onednn",
                                kv_cache_dtype="float32")
        assert isinstance(onednn.model.layers[0].attn.qkv.kernel, kernels.OnednnKernel)
        assert torch.allclose(logits(onednn, prompt), logits(int_mm, prompt), atol=1e-3)
        # one, a few, many rows: decode steps of that many rows, and prompts of that length
        for rows in (1, 3, 30):
            batch = [random_prompt(rows, VOCAB, seed) for seed in range(2)]
            assert onednn.generate_batch(batch, **options)[0].sequences_ids == \
                int_mm.generate_batch(batch, **options)[0].sequences_ids
    # A PyTorch without the quantized engine: kiln picks the fallback by itself.
    monkeypatch.setattr(kernels, "fbgemm_available", lambda: False)
    fallback = kiln.Generator(float_folder, compute_type="int8")
    assert isinstance(fallback.model.layers[0].attn.qkv.kernel, kernels.IntMMKernel)
    # The environment picks the backend where the code says "auto".
    monkeypatch.undo()  # fbgemm_available restored
    monkeypatch.setenv("KILN_INT8_BACKEND", "int_mm")
    assert kiln.Generator(float_folder, compute_type="int8").int8_backend == "int_mm"
    monkeypatch.setenv("KILN_INT8_BACKEND", "magic")
    with pytest.raises(ValueError, match="unknown int8 backend 'magic'"):
        kiln.Generator(float_folder, compute_type="int8")


def test_unknown_int8_backend(folders):
    with pytest.raises(ValueError, match="onednn, fbgemm, int_mm"):
        kiln.Generator(folders[2], compute_type="int8", int8_backend="magic")


def test_onednn_without_vnni_is_refused(folders, monkeypatch):
    monkeypatch.setattr(kernels, "_has_vnni", lambda: False)
    with pytest.raises(ValueError, match="needs a CPU with VNNI.*'fbgemm'"):
        kiln.Generator(folders[2], compute_type="int8", int8_backend="onednn")


def test_tied_int8_head_shares_the_embedding(tmp_path):
    model = build("llama", dict(LLAMA, tie_word_embeddings=True), seed=53)
    folder = kiln.convert(save_hf_model(model, tmp_path / "hf", tokenizer_vocab=96),
                          tmp_path / "q", quantization="int8")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    generator = kiln.Generator(folder, int8_backend="int_mm")
    assert generator.model.lm_head.weight is generator.model.embed.weight


DATA = Path(__file__).parent / "data"


def test_smollm2_int8_perplexity_within_one_percent_of_float32(default_model_cache):
    generator = kiln.Generator(cache_dir=default_model_cache, compute_type="int8")
    ids = generator.tokenizer.encode((DATA / "GPL-3").read_text(encoding="utf-8"))[:2048]
    nll = torch.nn.functional.cross_entropy(logits(generator, ids)[:-1], torch.tensor(ids[1:]))
    assert math.exp(nll.item()) <= 19.715 * 1.01


def test_fbgemm_without_vnni_never_saturates_and_decodes_in_8_bits(folders, monkeypatch):
    """Without VNNI fbgemm sums pairs of uint8 * int8 products in saturating int16, so a row
    it is given may hold uint8 0..128 only. Prompts then run their two passes at 63 levels
    (still as accurate as weight-only int8); a decode step sends each token as two rows whose
    products add up to its 8-bit one. Forced here, so it is checked on every CPU."""
    _, _, float_folder = folders
    monkeypatch.setattr(kernels.FbgemmKernel, "full_range", False)
    monkeypatch.setattr(kernels.FbgemmKernel, "levels", 63)
    # The worst case for int16 pairs: full-scale activations of either sign against weights
    # of 127 and -128 (8-bit activations would give pairs of up to 2 * 255 * 127).
    weight = torch.randint(-128, 128, (48, 256), dtype=torch.int8,
                           generator=torch.Generator().manual_seed(0))
    weight[0], weight[1], weight[2, 0::2], weight[2, 1::2] = 127, -128, 127, -128
    kernel = kernels.FbgemmKernel(weight, torch.ones(48), None)
    x = torch.cat([torch.ones(2, 256), -torch.ones(1, 256),
                   torch.rand(5, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1])
    x[1, 1::2] = -1.0
    row_max = x.abs().amax(-1, keepdim=True).double()
    eight_bit = torch.round(x.double() / row_max * 127) / 127 * row_max
    expected = eight_bit @ weight.double().t()
    error = (kernel(x, two_pass=False).double() - expected).abs().max()
    assert error <= 1e-5 * expected.abs().max()
    # two passes: each activation within 1 / (2 * 63 * 126) of its row's maximum
    exact = x.double() @ weight.double().t()
    bound = weight.double().abs().sum(1) / (2 * 63 * 126) * row_max + 1e-5 * exact.abs().max()
    assert ((kernel(x, two_pass=True).double() - exact).abs() <= bound).all()
    fbgemm = kiln.Generator(float_folder, compute_type="int8", int8_backend="fbgemm",
                            kv_cache_dtype="float32")
    weight_only = kiln.Generator(float_folder, compute_type="int8", int8_backend=None,
                                 kv_cache_dtype="float32")
    prompt = random_prompt(40, VOCAB, 5)
    expected, actual = logits(weight_only, prompt), logits(fbgemm, prompt)
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-3
    # Decode steps: as accurate as int_mm's 8-bit activations (7 bits would double the error).
    int_mm = kiln.Generator(float_folder, compute_type="int8", int8_backend="int_mm",
                            kv_cache_dtype="float32")
    reference = stepwise_logits(weight_only, prompt)
    errors = [((stepwise_logits(generator, prompt) - reference).norm() / reference.norm()).item()
              for generator in (fbgemm, int_mm)]
    assert errors[0] <= 1.1 * errors[1]


def test_cuda_routing_is_by_kind_of_pass_never_by_rows(folders, monkeypatch):
    """On CUDA the int_mm kernel runs every prompt (W8A8) and no decode step (weight-only,
    Triton there); `_int_mm` needs more than 16 rows, so a short prompt is padded with zero
    rows. Whether a row takes the kernel never depends on how many rows share its pass. The
    routing and padding are device-independent: checked here with the CUDA settings."""
    _, _, float_folder = folders
    generator = kiln.Generator(float_folder, compute_type="int8", int8_backend="int_mm",
                               kv_cache_dtype="float32", static_decode=False)
    short, long = random_prompt(5, VOCAB, 6), random_prompt(70, VOCAB, 7)
    expected = [logits(generator, short), logits(generator, long)]
    padded, kernel_rows, weight_only_rows = [], [], []
    original_call, original_weight_only = kernels.IntMMKernel.__call__, QuantizedLinear.weight_only
    original_int_mm = torch._int_mm
    monkeypatch.setattr(kernels.IntMMKernel, "__call__", lambda self, x, *rest: kernel_rows.append(
        x.shape[0]) or original_call(self, x, *rest))
    monkeypatch.setattr(QuantizedLinear, "weight_only", lambda self, x: weight_only_rows.append(
        x.reshape(-1, x.shape[-1]).shape[0]) or original_weight_only(self, x))
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: padded.append(a.shape[0])
                        or original_int_mm(a, b))
    for module in generator.model.modules():
        if isinstance(module, QuantizedLinear):
            module.kernel.pad_to, module.kernel.decodes = kernels.IntMMKernel.CUDA_MIN_ROWS, False
    actual = [logits(generator, short), logits(generator, long)]
    assert set(kernel_rows) == {5, 70} and not weight_only_rows  # prompts: the kernel
    assert min(padded) == 17  # 5 rows, two passes: 10 rows, padded
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got, want)  # zero rows change nothing
    generator.generate_batch([short], max_length=4, end_token=[], include_prompt_in_result=False)
    assert set(weight_only_rows) == {1}  # decode steps: weight-only


def test_cpu_backends_refuse_other_devices():
    weight = torch.ones(8, 8, dtype=torch.int8, device="meta")
    for backend in ("fbgemm", "onednn"):
        with pytest.raises(ValueError, match="runs on CPU only"):
            kernels.make_int8_kernel(weight, torch.ones(8, device="meta"), None, backend)
