"""The CUDA weight-only int8 kernels (kiln/quant/triton_int8.py), run on CPU by Triton's
interpreter (TRITON_INTERPRET=1, read when Triton is imported: hence a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kiln

from .conftest import save_hf_model, tiny_gpt_neox

pytest.importorskip("triton")

ROOT = Path(__file__).parents[1]


def interpreted(code: str, tmp_path: Path) -> dict:
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(code), encoding="utf-8")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_match_the_dequantized_matmul(tmp_path):
    # Shapes that are not multiples of any block (masks), one row (GEMV) and 2-64 rows
    # (tensor-core tiles), with and without bias. The interpreter cannot convert to bfloat16
    # inside tl.dot, so tiles are checked in float16 (the same code on a GPU).
    results = interpreted("""
        import json, torch
        from kiln.quant import triton_int8
        from kiln.quant.int8 import quantize_rows
        torch.manual_seed(0)
        errors = {}
        cases = [(torch.float16, 1, 50, 70), (torch.bfloat16, 1, 200, 33),
                 (torch.float16, 3, 40, 100), (torch.float16, 17, 33, 64),
                 (torch.float16, 64, 17, 40)]
        for dtype, rows, outputs, inner in cases:
            for with_bias in (False, True):
                weight, scale = quantize_rows(torch.randn(outputs, inner), "int8")
                bias = torch.randn(outputs).to(dtype) if with_bias else None
                x = torch.randn(rows, inner).to(dtype)
                y = triton_int8.linear(x, weight, (1 / scale).contiguous(), bias)
                expected = x.float() @ (weight.float() / scale[:, None]).t()
                if bias is not None:
                    expected += bias.float()
                assert y.dtype == dtype and y.shape == (rows, outputs)
                key = f"{dtype}-{rows}-{with_bias}"
                errors[key] = ((y.float() - expected).abs().max() / expected.abs().max()).item()
        try:
            triton_int8.linear(torch.zeros(65, 8, dtype=torch.float16),
                               torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), None)
        except ValueError as error:
            errors["refused"] = str(error)
        print(json.dumps(errors))
    """, tmp_path)
    assert "M <= 64" in results.pop("refused")
    for key, error in results.items():
        limit = 8e-3 if "bfloat16" in key else 1e-3  # the output's rounding
        assert error < limit, (key, error)


def test_a_model_through_the_kernels_equals_the_plain_path(tmp_path):
    """A tiny int8 GPT-NeoX in float16 with every projection in Triton vs the cast-and-matmul
    path: the same greedy tokens and logits within float16 rounding."""
    source = save_hf_model(tiny_gpt_neox(seed=5), tmp_path / "hf", tokenizer_vocab=90)
    folder = kiln.convert(source, tmp_path / "int8", quantization="int8")
    results = interpreted(f"""
        import json, torch
        import kiln
        from kiln.quant import int8, triton_int8
        calls = []
        original = triton_int8.linear
        int8.triton_int8.linear = lambda *args: calls.append(args[0].shape[0]) or original(*args)
        # static_decode=False: CPU would trace the step (when the engine starts); CUDA
        # captures it instead
        generator = kiln.Generator({str(folder)!r}, compute_type="int8_float16",
                                   int8_backend=None, static_decode=False)
        prompts = [[5, 9, 13, 2, 40, 7], [3, 4]]
        options = dict(max_length=10, end_token=[], include_prompt_in_result=False)
        fused = generator.generate_batch(prompts, **options)
        fused += generator.generate_batch(prompts[:1], **options)  # one row: the GEMV
        fused_logits = generator.forward_batch([prompts[0]])
        used = sorted(set(calls))
        int8.triton_int8.available = lambda device: False
        plain = generator.generate_batch(prompts, **options)
        plain += generator.generate_batch(prompts[:1], **options)
        plain_logits = generator.forward_batch([prompts[0]])
        print(json.dumps({{
            "used": used,
            "same_tokens": [r.sequences_ids for r in fused] == [r.sequences_ids for r in plain],
            "logits_error": (fused_logits - plain_logits).abs().max().item(),
            "scale": plain_logits.abs().max().item()}}))
    """, tmp_path)
    assert 1 in results["used"] and any(rows > 1 for rows in results["used"])
    assert results["same_tokens"]
    assert results["logits_error"] < 1e-2 * results["scale"]
