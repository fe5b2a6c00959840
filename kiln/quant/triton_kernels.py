"""Triton kernels of triton_int8.py, in a module of their own so that importing kiln never
imports Triton (~0.2 s); triton_int8 loads this on first use on CUDA. It imports nothing of
kiln's, so the two modules do not import each other."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) gets one small config per kernel.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _gemv_configs():
    if INTERPRETING:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32})]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
            for n, k, w in ((8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4),
                            (32, 512, 8), (64, 256, 8), (16, 1024, 8))]


def _tile_configs():
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                          num_stages=s)
            for m, n, k, w, s in ((16, 64, 128, 4, 4), (16, 128, 128, 4, 4),
                                  (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
                                  (64, 64, 64, 4, 3), (64, 128, 64, 8, 3))]


@triton.autotune(configs=_gemv_configs(), key=["N", "K"])
@triton.jit

def gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0)
        acc += w.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1) * tl.load(s_ptr + rows, mask=row_ok, other=1.0)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.autotune(configs=_tile_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit

def tile_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, M_BUCKET,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + n[None, :] * K + k[:, None], mask=k_ok[:, None] & n_ok[None, :],
                    other=0)  # [BLOCK_K, BLOCK_N]: W^T, read along K as stored
        acc += tl.dot(x, w.to(x.dtype))
    acc *= tl.load(s_ptr + n, mask=n_ok, other=1.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
