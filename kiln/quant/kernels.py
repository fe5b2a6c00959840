"""int8 matmul kernels behind one small interface, so a PyTorch change can only swap a backend.

Every backend computes `x @ W^T` for an int8 weight `W = Wq / scale` (one scale per row) with
the activations quantized **per token** (per row of x), never with one scale for a whole
prompt. Rows are first normalised by their own max, so all values lie in [-1, 1]:

- decode steps: one int8 pass, 8-bit activations per token, as CTranslate2 does; the
  weights stream from memory once.
- prompts and scoring: two passes, the rounded activations and then their residual, which
  gives ~16-bit activations (the error of weight-only int8) at twice the int8 compute,
  still about the cost of a float32 GEMM.

Which of the two a call runs is the caller's choice (the kind of forward pass), never the
number of rows: a row's result is then the same whatever rows share the call, since every
row is quantized on its own and integer products are exact.

Backends:
- "fbgemm" (the default): PyTorch's x86 quantized engine, weight prepacked at load. Its
  one-row GEMV is the fastest measured here (decode at batch 1). It uses the quantized-tensor
  API PyTorch plans to retire, hence the others. On CPUs without VNNI it multiplies uint8
  activations by int8 weights with vpmaddubsw, which sums each pair of products in
  saturating int16, so a row it is given may hold only 129 activation values (uint8 0..128):
  prompts then run their two passes at 63 levels (~14-bit activations, still the error of
  weight-only int8), and a decode step keeps its exact 8-bit activations by sending each
  token as two rows, halves of its integers, in the same call (the weight streams once).
- "onednn": oneDNN's int8 matmul (the op PyTorch's own int8 compiler path uses), weight
  reordered at load, CPUs with VNNI only. Packs ~2x faster than fbgemm and runs prompts
  (AMX where the CPU has it) and batched decode faster, but its one-row GEMV is slower.
- "int_mm": `torch._int_mm` on a transposed view of the stored weight: the tested fallback.
"""

from __future__ import annotations

import warnings

import torch

BACKENDS = ("onednn", "fbgemm", "int_mm")


def _has_vnni() -> bool:
    """Without VNNI, fbgemm sums u8*s8 pairs in saturating int16: activations need 7 bits."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class Int8Kernel:
    """One linear layer's int8 weight, packed for a backend."""

    stored_weight: torch.Tensor | None  # the plain int8 weight if the kernel still needs it
    # False: decode steps run weight-only instead (QuantizedLinear.weight_only, which needs
    # stored_weight); the choice is by kind of pass, never by row count.
    decodes = True
    levels = 127  # activations are quantized to multiples of 1 / levels in [-1, 1]
    bias: torch.Tensor | None  # float32, added after the product

    def grid_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 in [-1, 1] -> x @ W^T float32 (no bias), x rounded to multiples
        of 1/levels."""
        raise NotImplementedError

    def one_pass(self, x: torch.Tensor) -> torch.Tensor:
        """A decode step's product: x [M, K] in [-1, 1] rounded to 8 bits (multiples of 1/127)."""
        return self.grid_matmul(x)

    def __call__(self, x: torch.Tensor, two_pass: bool = True) -> torch.Tensor:
        """x @ W^T + bias for float x [M, K]: one pass (decode) or two (prompts)."""
        x = x.float()
        row_max = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        x = x / row_max
        if two_pass:
            # |x - coarse| <= 1/(2 levels): the residual, scaled back to [-1, 1], is a 2nd pass,
            # run in the same call as the first: the weight streams once for both.
            rows, gain = x.shape[0], 2.0 * self.levels
            coarse = torch.round(x * self.levels) / self.levels
            both = self.grid_matmul(torch.cat((coarse, (x - coarse) * gain)))
            product = both[:rows].add_(both[rows:], alpha=1.0 / gain)
        else:
            product = self.one_pass(x)
        if self.bias is None:
            return product * row_max
        return torch.addcmul(self.bias, product, row_max)


class FbgemmKernel(Int8Kernel):
    # Without VNNI a row's uint8 activations must stay within 0..128: 2 * 128 * 127 and
    # 2 * 128 * -128 fit int16, so no pair of products saturates whatever the weights.
    full_range = _has_vnni()
    levels = 127 if full_range else 63  # the two passes' grid; a decode step's is always 127
    HALF_ROW_OFFSETS = torch.tensor([0.25, -0.25]).view(2, 1, 1) / 127.0

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        self.bias = None if bias is None else bias.detach().float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the quantized-tensor API warns it is deprecated
            zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
            quantized = torch._make_per_channel_quantized_tensor(
                weight.contiguous(), (1.0 / scale).double(), zero_points, 0)
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.stored_weight = None  # the packed copy is all the kernel needs

    def grid_matmul(self, x: torch.Tensor) -> torch.Tensor:
        # Quantizes x to uint8 with scale 1/levels around the zero point levels+1 (exact on the
        # grid), int8 GEMM, dequantizes with the per-row weight scales: float32 out.
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, 1.0 / self.levels, self.levels + 1, self.packed)

    def one_pass(self, x: torch.Tensor) -> torch.Tensor:
        if self.full_range:
            return self.grid_matmul(x)
        # The 8-bit integers q = round(127x) (int_mm's and oneDNN's) go in as two rows,
        # q/2 + 1/4 and q/2 - 1/4 on the grid 1/127: fbgemm rounds them to two integers in
        # -64..64 (uint8 0..128 around the zero point 64; never a tie) that add up to q, so
        # the two rows' products add up to q's exactly. One op builds both rows.
        q = torch.round(x * 127.0)
        both = torch.add(self.HALF_ROW_OFFSETS, q, alpha=0.5 / 127.0).flatten(0, 1)
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            both, 1.0 / 127.0, 64, self.packed).unflatten(0, (2, -1)).sum(0)


class OnednnKernel(Int8Kernel):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.packed = torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)
        self.inverse_scale = (1.0 / scale.float()).contiguous()
        self.zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        self.stored_weight = None  # the reordered copy is all the kernel needs

    def grid_matmul(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN takes one activation scale per call: the grid's own, 1/levels.
        quantized = torch.round(x * self.levels).to(torch.int8)
        return torch.ops.onednn.qlinear_pointwise(
            quantized, 1.0 / self.levels, 0, self.packed, self.inverse_scale, self.zero_points,
            None, 1.0, 0, torch.float32, "none", [], "")


class IntMMKernel(Int8Kernel):
    """On CUDA this is W8A8 for prompts and weight-only for decode steps (up to
    triton_int8.MAX_ROWS rows the weight-only kernel streams the weight once anyway).
    `_int_mm` needs more than 16 rows there: fewer are padded with zero rows, whose products
    are dropped, so whether a prompt's rows take the kernel never depends on how many rows
    share its pass."""

    CUDA_MIN_ROWS = 17

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        self.pad_to = self.CUDA_MIN_ROWS if weight.is_cuda else 1
        self.decodes = not weight.is_cuda
        self.bias = None if bias is None else bias.detach().float()
        self.stored_weight = weight
        self.transposed = weight.t()  # a view: _int_mm reads it without a copy
        self.inverse_scale = (1.0 / scale.float()) / self.levels

    def grid_matmul(self, x: torch.Tensor) -> torch.Tensor:
        quantized = torch.round(x * self.levels).to(torch.int8)
        rows = quantized.shape[0]
        if rows < self.pad_to:  # integer products: the real rows' sums are exact either way
            quantized = torch.nn.functional.pad(quantized, (0, 0, 0, self.pad_to - rows))
        return torch._int_mm(quantized, self.transposed)[:rows].float() * self.inverse_scale


def fbgemm_available() -> bool:
    try:
        if not any(engine in torch.backends.quantized.supported_engines
                   for engine in ("x86", "fbgemm")):
            return False
        FbgemmKernel(torch.ones(8, 8, dtype=torch.int8), torch.ones(8), None)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def onednn_available() -> bool:
    """oneDNN is exact only with VNNI (older CPUs saturate pairs of u8*s8 products)."""
    if not _has_vnni():
        return False
    try:
        kernel = OnednnKernel(torch.ones(8, 8, dtype=torch.int8), torch.ones(8), None)
        return bool(torch.allclose(kernel(torch.ones(2, 8)), torch.full((2, 8), 8.0)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def default_backend(device: torch.device) -> str | None:
    """The fastest working int8 backend for the device (None: weight-only, dequantized inside
    the matmul; on CUDA "int_mm" adds W8A8 for many rows, measured by gpu_check)."""
    if device.type != "cpu":
        return None
    return "fbgemm" if fbgemm_available() else "int_mm"


def make_int8_kernel(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     backend: str) -> Int8Kernel:
    if backend not in BACKENDS:
        raise ValueError(f"unknown int8 backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend in ("onednn", "fbgemm") and weight.device.type != "cpu":
        raise ValueError(f"the int8 backend {backend!r} runs on CPU only; on {weight.device.type} "
                         "use int8_backend=None (weight-only) or 'int_mm' (W8A8 for many rows)")
    if backend == "onednn" and not onednn_available():
        raise ValueError("the int8 backend 'onednn' needs a CPU with VNNI and a PyTorch with "
                         "torch.ops.onednn; use int8_backend='fbgemm' or 'int_mm'")
    kernel_class = {"onednn": OnednnKernel, "fbgemm": FbgemmKernel, "int_mm": IntMMKernel}[backend]
    return kernel_class(weight, scale, bias)
