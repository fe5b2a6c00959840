"""The one decoder: every supported family runs through these modules, built from a ModelSpec.

Weight names (what a kiln folder stores):
    embed.weight, pos_embed.weight (learned positions only),
    layers.{i}.attn_norm.{weight,bias}, layers.{i}.mlp_norm.{weight,bias},
    layers.{i}.attn.qkv.{weight,bias}   all query heads, then all key heads, then all values
    layers.{i}.attn.out.{weight,bias},
    layers.{i}.mlp.up.{weight,bias}     for a gated MLP: gate rows, then up rows
    layers.{i}.mlp.down.{weight,bias},
    final_norm.{weight,bias}, lm_head.weight (absent when tied to embed.weight)

Every projection is an attribute holding a module that maps [..., in] -> [..., out] and takes
`two_pass` (how int8 kernels quantize activations: two passes for prompts, one for decode
steps), so a quantized linear can replace `nn.Linear` (see `build_decoder`) without touching
this file.

Modules are created on the meta device (no memory, no init) and receive their weights from
the loader with `load_state_dict(assign=True)`. Passing `device=META` explicitly rather than
entering `with torch.device("meta")` keeps loading fast: that context imports torch._dynamo.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.int4 import DEFAULT_GROUP_SIZE, Int4Linear
from ..quant.int8 import QuantizedEmbedding, QuantizedLinear
from ..quant.stored import weight_type
from .kv_cache import KVCache
from .rotary import RotaryTable, apply_rotary
from .spec import ModelSpec

META = torch.device("meta")
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class MetaLinear(nn.Linear):
    """nn.Linear on the meta device without its random init (~1 ms each, all thrown away:
    the loader assigns the real weights)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias, device=META)

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor, two_pass: bool = True) -> torch.Tensor:  # noqa: ARG002
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=META))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference implementations do; low precision drifts.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return RMSNorm(spec.hidden_size, spec.norm_eps)
    return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps, bias=spec.norm_bias, device=META)


@dataclass
class Span:
    """One sequence's prompt chunk in a packed prefill: tokens begin..end-1 of the pass, all
    in `slot`, attending over the slot's first kv_length columns."""

    begin: int
    end: int
    slot: int
    kv_length: int
    mask: torch.Tensor | None = None  # [1, 1, end - begin, kv_length]


@dataclass
class StepInputs:
    """Per-forward tensors shared by every layer: computed once, not per layer."""

    write_slots: torch.Tensor  # [B, 1] slot of each row, broadcast against positions
    write_positions: torch.Tensor  # [B, T] cache column each token writes
    read_rows: slice | torch.Tensor  # which slots to attend over
    kv_length: int  # columns of the cache to attend over
    mask: torch.Tensor | None  # [B, 1, T, kv_length] True where a query may see a key
    cos: torch.Tensor | None  # [B, T, 1, rotary_dim]
    sin: torch.Tensor | None
    two_pass: bool = True  # int8 activations in two passes (prompts) or one (decode)
    spans: list[Span] | None = None  # a packed prefill: attention chunk by chunk


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.qkv = MetaLinear(spec.hidden_size, spec.q_size + 2 * spec.kv_size, bias=spec.qkv_bias)
        self.out = MetaLinear(spec.q_size, spec.hidden_size, bias=spec.attn_out_bias)
        self.scale = spec.attention_scale or spec.head_dim ** -0.5

    def forward(self, x: torch.Tensor, step: StepInputs, keys: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        batch, length, _ = x.shape
        heads = self.qkv(x, step.two_pass).view(batch, length, spec.num_heads + 2 * spec.num_kv_heads,
                                                spec.head_dim)
        query_and_key, v = heads.split([spec.num_heads + spec.num_kv_heads, spec.num_kv_heads], dim=2)
        if step.cos is not None:  # queries and keys side by side: one rotation for both
            query_and_key = apply_rotary(query_and_key, step.cos, step.sin)
        q, k = query_and_key.split([spec.num_heads, spec.num_kv_heads], dim=2)
        # Advanced indices around a slice: the indexed view is [B, T, kv_heads, head_dim].
        keys[step.write_slots, :, step.write_positions] = k.to(keys.dtype)
        values[step.write_slots, :, step.write_positions] = v.to(values.dtype)
        # A cache in a narrower type (bfloat16 keys for float32 activations): attention runs
        # in the cache's type, which reads half the bytes (measured faster on CPU).
        q = q.transpose(1, 2).to(keys.dtype)
        if step.spans is not None:
            attended = self._attend_spans(q, keys, values, step.spans).to(x.dtype)
            return self.out(attended.transpose(1, 2).reshape(batch, length, spec.q_size),
                            step.two_pass)
        past_k = keys[step.read_rows, :, : step.kv_length]
        past_v = values[step.read_rows, :, : step.kv_length]
        if length == 1 and q.device.type == "cpu":
            attended = one_query_attention(q, past_k, past_v, step.mask, self.scale)
        else:
            attended = F.scaled_dot_product_attention(
                q, past_k, past_v, attn_mask=step.mask, scale=self.scale,
                enable_gqa=spec.num_kv_heads != spec.num_heads)
        attended = attended.to(x.dtype)
        return self.out(attended.transpose(1, 2).reshape(batch, length, spec.q_size),
                        step.two_pass)

    def _attend_spans(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      spans: list[Span]) -> torch.Tensor:
        """A packed prefill's attention, chunk by chunk: each chunk's queries [1, H, T, D]
        over its own slot, the shapes it has alone, whatever else shares the pass (CPU SDPA
        gives a row different bits for different numbers of queries)."""
        gqa = self.spec.num_kv_heads != self.spec.num_heads
        parts = []
        for span in spans:
            past_k = keys[span.slot:span.slot + 1, :, : span.kv_length]
            past_v = values[span.slot:span.slot + 1, :, : span.kv_length]
            parts.append(F.scaled_dot_product_attention(
                q[:, :, span.begin:span.end], past_k, past_v, attn_mask=span.mask,
                scale=self.scale, enable_gqa=gqa))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def one_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query per row (decode steps, speculative verification) as plain
    batched matmuls: q [B, H, 1, D], keys/values [B, KV, L, D], mask [B, 1, 1, L].

    On CPU, scaled_dot_product_attention's one-query path gives a row results that depend on
    how many rows share the call (~1e-7, measured), which is enough to flip a near-tie and
    break "the same tokens alone or batched". Each matmul here computes a row on its own,
    whatever the batch; it costs ~35 us more per layer than SDPA at one row and 512 columns.
    """
    batch, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h reads kv head h // G
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    attended = torch.matmul(scores.softmax(dim=-1), values)
    return attended.reshape(batch, heads, 1, dim)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        up_size = spec.intermediate_size * (2 if spec.gated_mlp else 1)
        self.up = MetaLinear(spec.hidden_size, up_size, bias=spec.mlp_bias)
        self.down = MetaLinear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.activation = _ACTIVATIONS[spec.activation]
        self.gated = spec.gated_mlp

    def forward(self, x: torch.Tensor, two_pass: bool = True) -> torch.Tensor:
        hidden = self.up(x, two_pass)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = self.activation(gate) * up
        else:
            hidden = self.activation(hidden)
        return self.down(hidden, two_pass)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.attn_norm = make_norm(spec)
        self.mlp_norm = make_norm(spec)
        self.attn = Attention(spec)
        self.mlp = MLP(spec)
        self.parallel_residual = spec.parallel_residual

    def forward(self, x: torch.Tensor, step: StepInputs, keys: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
        attended = self.attn(self.attn_norm(x), step, keys, values)
        if self.parallel_residual:
            return x + attended + self.mlp(self.mlp_norm(x), step.two_pass)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x), step.two_pass)


def _meta_embedding(rows: int, size: int) -> nn.Embedding:
    # Given a weight, nn.Embedding skips its random init (normal_ on meta imports torch._dynamo).
    return nn.Embedding(rows, size, _weight=torch.empty(rows, size, device=META))


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = _meta_embedding(spec.vocab_size, spec.hidden_size)
        if spec.position == "learned":
            self.pos_embed = _meta_embedding(spec.max_position_embeddings, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.num_layers))
        self.final_norm = make_norm(spec)
        if not spec.tie_word_embeddings:  # a tied head is made by tie_head() after loading
            self.lm_head = MetaLinear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotary: RotaryTable | None = None
        self.int8_backend: str | None = None  # set by the loader when it packs int8 kernels

    def prepare(self, device: torch.device) -> None:
        """Build non-persistent tables after the weights are loaded (the model may live on
        meta)."""
        if self.spec.position == "rotary":
            self.rotary = RotaryTable(self.spec, device=device)

    def tie_head(self, head: nn.Module) -> None:
        """Give a tied model its output projection, sharing the embedding's tensors."""
        self.lm_head = head

    def logits(self, hidden: torch.Tensor, two_pass: bool = True) -> torch.Tensor:
        return self.lm_head(hidden, two_pass)

    def step_inputs(self, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor | None,
                    kv_length: int, dtype: torch.dtype) -> StepInputs:
        batch = positions.shape[0]
        if slots is None:
            write_slots = torch.arange(batch, device=positions.device).unsqueeze(1)
            read_rows: slice | torch.Tensor = slice(0, batch)
        else:
            write_slots = slots.unsqueeze(1)
            read_rows = slots
        columns = torch.arange(kv_length, device=positions.device).view(1, 1, -1)
        query_positions = positions.unsqueeze(-1)
        mask = columns <= query_positions
        if self.spec.sliding_window is not None:
            mask &= columns > query_positions - self.spec.sliding_window
        mask = mask.unsqueeze(1)
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary.lookup(positions, dtype)
        return StepInputs(write_slots, positions, read_rows, kv_length, mask, cos, sin)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, *,
                kv_length: int, slots: torch.Tensor | None = None,
                last_index: torch.Tensor | None = None, decode: bool = False) -> torch.Tensor:
        """Run tokens [B, T] at absolute cache positions [B, T]; return float32 logits.

        Padding tokens carry `cache.scratch_position`; rows use slots 0..B-1 unless `slots`
        names them. `kv_length` bounds the columns attended over (max position + 1).
        With `last_index` [B], logits are computed only at that index of each row.
        `decode`: a decode step, whose int8 activations take one 8-bit pass per token
        (prompts and scoring take two, ~16 bits).
        """
        hidden = self._embed(input_ids, positions)
        step = self.step_inputs(positions, cache, slots, kv_length, hidden.dtype)
        step.two_pass = not decode
        hidden = self._layers(hidden, step, cache)
        if last_index is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
        return self.logits(self.final_norm(hidden), step.two_pass).float()

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                spans: list[Span], cache: KVCache, logits_at: torch.Tensor) -> torch.Tensor:
        """Prompt chunks of several sequences packed into one pass, no padding: tokens [N]
        at cache positions [N] of slots [N]; `spans` says which tokens form each chunk. The
        projections run on all N tokens at once (int8 activations in two passes, per token);
        attention runs chunk by chunk. Float32 logits [len(logits_at), V] of the tokens at
        `logits_at`."""
        ids, positions = input_ids.view(1, -1), positions.view(1, -1)
        hidden = self._embed(ids, positions)
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary.lookup(positions, hidden.dtype)
        for span in spans:
            columns = torch.arange(span.kv_length, device=positions.device).view(1, 1, -1)
            queries = positions[0, span.begin:span.end].view(1, -1, 1)
            mask = columns <= queries
            if self.spec.sliding_window is not None:
                mask &= columns > queries - self.spec.sliding_window
            span.mask = mask.unsqueeze(1)
        step = StepInputs(slots.view(1, -1), positions, slice(None), 0, None, cos, sin,
                          two_pass=True, spans=spans)
        hidden = self._layers(hidden, step, cache)
        if logits_at.numel() == 0:  # no chunk ends its prompt here
            return hidden.new_zeros(0, self.spec.vocab_size, dtype=torch.float32)
        return self.logits(self.final_norm(hidden[0, logits_at])).float()

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        if self.spec.position == "learned":
            real_positions = positions.clamp(max=self.spec.max_position_embeddings - 1)
            hidden = hidden + self.pos_embed(real_positions)
        return hidden

    def _layers(self, hidden: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        for layer, keys, values in zip(self.layers, cache.keys, cache.values, strict=True):
            hidden = layer(hidden, step, keys, values)
        return hidden


def quantizable_modules(decoder: Decoder) -> Iterator[tuple[str, nn.Module]]:
    """The projections and the token embedding, which integer weights may replace."""
    for name, module in decoder.named_modules():
        if isinstance(module, nn.Linear) or name == "embed":
            yield name, module


def build_decoder(spec: ModelSpec, weights: str | None = None,
                  dtype: torch.dtype = torch.float32, group_size: int | None = None) -> Decoder:
    """The decoder on the meta device (no memory), with integer-weight modules if asked
    (int4: 4-bit projections in groups of `group_size`, embedding and head in int8)."""
    decoder = Decoder(spec)
    if weights is not None:
        for name, module in list(quantizable_modules(decoder)):
            bits = weight_type(f"{name}.weight", weights)
            if isinstance(module, nn.Linear) and bits == "int4":
                replacement = Int4Linear(module.in_features, module.out_features,
                                         module.bias is not None,
                                         group_size or DEFAULT_GROUP_SIZE, dtype)
            elif isinstance(module, nn.Linear):
                replacement = QuantizedLinear(module.in_features, module.out_features,
                                              module.bias is not None, bits, dtype)
            else:
                replacement = QuantizedEmbedding(spec.vocab_size, spec.hidden_size, bits, dtype)
            decoder.set_submodule(name, replacement)
    return decoder


def quantizable_weight_names(spec: ModelSpec) -> set[str]:
    return {f"{name}.weight" for name, _ in quantizable_modules(build_decoder(spec))}


def expected_weight_shapes(spec: ModelSpec, weights: str | None = None,
                           group_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor a kiln folder must hold for this spec, with its shape."""
    return {name: tuple(tensor.shape)
            for name, tensor in expected_weights(spec, weights, group_size).items()}


def expected_weights(spec: ModelSpec, weights: str | None = None,
                     group_size: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor a kiln folder must hold, as an empty meta tensor (shape and, for integer
    weights and their scales, dtype)."""
    return dict(build_decoder(spec, weights, group_size=group_size).state_dict())


def input_sizes(spec: ModelSpec) -> dict[str, int]:
    """The input size (columns) of every quantizable weight, by name."""
    sizes = {}
    for name, module in quantizable_modules(build_decoder(spec)):
        sizes[f"{name}.weight"] = spec.hidden_size if name == "embed" else module.in_features
    return sizes
