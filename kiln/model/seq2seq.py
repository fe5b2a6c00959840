"""The one encoder-decoder of kiln's translation models (BART, mBART, Marian/OPUS-MT,
M2M100/NLLB, T5/mT5/Flan-T5), built from a `Seq2SeqSpec` holding the choices in which they
differ: where the norms sit and which (LayerNorm or T5's RMSNorm), how positions enter
(absolute tables, or T5's relative position buckets added to the attention scores), whether
embeddings are scaled, a gated MLP, biases.

The encoder runs a padded batch once; the decoder runs one step at a time for B rows (beams
included), with the keys and values of its self-attention grown per step and those of its
cross-attention computed once per source and gathered when beams are reordered.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import ACTIVATIONS, embedding, linear, project

POSITIONS = ("learned", "sinusoidal", "sinusoidal_interleaved", "relative")


@dataclass(frozen=True)
class Seq2SeqSpec:
    family: str  # the adapter that wrote it: bart, mbart, marian, m2m_100
    vocab_size: int
    hidden_size: int
    num_heads: int
    encoder_layers: int
    decoder_layers: int
    encoder_ffn: int
    decoder_ffn: int
    max_position_embeddings: int
    activation: str = "gelu"
    pre_norm: bool = False  # x + f(norm(x)) (mBART, M2M100) instead of norm(x + f(x))
    final_norms: bool = False  # a norm after the last encoder and decoder layers
    embedding_norm: bool = False  # a norm right after the embeddings (BART, mBART)
    # learned: a table indexed from position_offset; sinusoidal: sin half then cos half
    # (M2M100), sinusoidal_interleaved: Marian's table (sin of even, cos of odd frequencies)
    positions: str = "learned"
    position_offset: int = 0
    scale_embedding: bool = False  # embeddings times sqrt(hidden_size)
    logits_bias: bool = False  # final_logits_bias (BART, Marian)
    norm_eps: float = 1e-5
    decoder_start_token_id: int = 2
    pad_token_id: int = 1
    eos_token_id: int = 2
    norm: str = "layernorm"  # or "rmsnorm" (T5: no mean, no bias)
    linear_bias: bool = True
    attention_head_dim: int | None = None  # T5's d_kv; None: hidden_size / num_heads
    gated_mlp: bool = False  # act(x W_gate) * (x W_up) (T5 v1.1, Flan-T5)
    attention_scale: float | None = None  # None: 1/sqrt(head_dim); T5: 1
    relative_buckets: int = 32  # T5's relative position buckets
    relative_max_distance: int = 128
    output_scale: float = 1.0  # the decoder's output times this before lm_head (T5: d^-0.5)
    zero_start: bool = False  # the decoder's first input embeds to zeros (CTranslate2's Marian)
    # return_attention / coverage_penalty read the cross-attention of this decoder layer,
    # averaged over its first alignment_heads heads (CTranslate2's defaults: last layer, 1)
    alignment_layer: int = -1
    alignment_heads: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_heads", "encoder_layers",
                     "decoder_layers", "encoder_ffn", "decoder_ffn", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"invalid Seq2SeqSpec: {name} must be a positive int, got "
                                 f"{value!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"invalid Seq2SeqSpec: positions {self.positions!r} is not one of "
                             f"{POSITIONS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"invalid Seq2SeqSpec: activation {self.activation!r}")

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    @property
    def inner_size(self) -> int:
        return self.num_heads * self.head_dim

    def make_norm(self, dtype: torch.dtype) -> nn.Module:
        if self.norm == "rmsnorm":
            return nn.RMSNorm(self.hidden_size, eps=self.norm_eps, dtype=dtype, device="meta")
        return nn.LayerNorm(self.hidden_size, eps=self.norm_eps, dtype=dtype, device="meta")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sinusoids(positions: int, dim: int, interleaved: bool) -> torch.Tensor:
    """The fixed position table: [sin | cos] halves over frequencies 10000^(-i/(dim/2-1))
    (fairseq, M2M100), or Marian's: column j uses frequency 10000^(-2*floor(j/2)/dim), sin for
    the first half of the columns (even j) and cos for the second (odd j)."""
    position = torch.arange(positions, dtype=torch.float64)[:, None]
    if interleaved:
        j = torch.arange(dim, dtype=torch.float64)
        angles = position / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
        table = torch.empty(positions, dim, dtype=torch.float64)
        half = dim // 2 + dim % 2
        table[:, :half] = torch.sin(angles[:, 0::2])
        table[:, half:] = torch.cos(angles[:, 1::2])
        return table.float()
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float64)
                            * -(math.log(10000.0) / (half - 1)))
    angles = position * frequencies[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(positions, 1, dtype=torch.float64)], dim=1)
    return table.float()


def relative_buckets(relative: torch.Tensor, bidirectional: bool, buckets: int,
                     max_distance: int) -> torch.Tensor:
    """T5's bucket of each (key position - query position): exact for small distances,
    logarithmic up to max_distance; both signs (encoder) or only the past (decoder)."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket += (relative > 0).long() * buckets
        relative = relative.abs()
    else:
        relative = -relative.clamp(max=0)
    exact = buckets // 2
    large = exact + (torch.log(relative.float() / exact) / math.log(max_distance / exact)
                     * (buckets - exact)).long()
    large = large.clamp(max=buckets - 1)
    return bucket + torch.where(relative < exact, relative, large)


class Attention(nn.Module):
    def __init__(self, spec: Seq2SeqSpec, weights: str | None, dtype: torch.dtype,
                 cross: bool) -> None:
        super().__init__()
        hidden, inner, bias = spec.hidden_size, spec.inner_size, spec.linear_bias
        self.heads, self.head_dim, self.cross = spec.num_heads, spec.head_dim, cross
        self.scale = spec.attention_scale
        self.q = linear(hidden, inner, weights, dtype, bias)
        self.kv = linear(hidden, 2 * inner, weights, dtype, bias)
        self.out = linear(inner, hidden, weights, dtype, bias)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, heads, T, d]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def keys_values(self, x: torch.Tensor,
                    two_pass: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = project(self.kv, x, two_pass).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, bias: torch.Tensor | None = None,
                two_pass: bool = True, probabilities: list | None = None,
                heads: int = 1) -> torch.Tensor:
        """With a `probabilities` list, the attention weights of the first `heads` heads,
        averaged, are appended to it ([B, T, S], float32): computed apart, so the output is
        the same with or without."""
        q = self.split(project(self.q, x, two_pass))
        if bias is not None:  # position bias plus -inf where the mask forbids
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        if probabilities is not None:
            probabilities.append(self._weights(q[:, :heads], k[:, :heads], mask))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        batch, length = x.shape[0], x.shape[1]
        return project(self.out, attended.transpose(1, 2).reshape(batch, length, -1), two_pass)

    def _weights(self, q: torch.Tensor, k: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        if mask is not None:
            scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                      else scores + mask.float())
        return scores.softmax(-1).mean(1)


class Block(nn.Module):
    """An encoder layer (self-attention, MLP) or a decoder layer (self-attention,
    cross-attention, MLP), each part with its norm before or after."""

    def __init__(self, spec: Seq2SeqSpec, weights: str | None, dtype: torch.dtype,
                 decoder: bool) -> None:
        super().__init__()
        hidden, ffn = spec.hidden_size, spec.decoder_ffn if decoder else spec.encoder_ffn
        self.pre_norm, self.gated = spec.pre_norm, spec.gated_mlp
        self.self_attn = Attention(spec, weights, dtype, cross=False)
        self.self_norm = spec.make_norm(dtype)
        self.cross_attn = Attention(spec, weights, dtype, cross=True) if decoder else None
        self.cross_norm = spec.make_norm(dtype) if decoder else None
        self.up = linear(hidden, 2 * ffn if spec.gated_mlp else ffn, weights, dtype,
                         spec.linear_bias)
        self.down = linear(ffn, hidden, weights, dtype, spec.linear_bias)
        self.mlp_norm = spec.make_norm(dtype)
        self.act = ACTIVATIONS[spec.activation]

    def residual(self, x: torch.Tensor, norm: nn.Module, f) -> torch.Tensor:
        if self.pre_norm:
            return x + f(norm(x))
        return norm(x + f(x))

    def mlp(self, x: torch.Tensor, two_pass: bool = True) -> torch.Tensor:
        hidden = project(self.up, x, two_pass)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            return project(self.down, self.act(gate) * up, two_pass)
        return project(self.down, self.act(hidden), two_pass)

    def encode(self, x: torch.Tensor, mask: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        def attend(h):
            k, v = self.self_attn.keys_values(h)
            return self.self_attn(h, k, v, mask, bias)

        x = self.residual(x, self.self_norm, attend)
        return self.residual(x, self.mlp_norm, self.mlp)

    def decode(self, x: torch.Tensor, cache: dict, source: tuple[torch.Tensor, torch.Tensor],
               source_mask: torch.Tensor, bias: torch.Tensor | None = None,
               probabilities: list | None = None, heads: int = 1) -> torch.Tensor:
        """One or more new target positions of every row; `cache` holds this layer's
        self-attention keys/values so far (updated in place). A single position is a decode
        step: int8 activations in one 8-bit pass, as the decoders' steps."""
        two_pass = x.shape[1] > 1

        def attend(h):
            k, v = self.self_attn.keys_values(h, two_pass)
            if not isinstance(cache, dict):  # the engine's slots (seq2seq_slots.py)
                k, v, mask = cache.store(k, v)
                return self.self_attn(h, k, v, mask, bias, two_pass)
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            new, total = h.shape[1], k.shape[2]
            mask = None
            if new > 1:  # several positions at once (a target prefix): causal among them
                mask = torch.ones(new, total, dtype=torch.bool, device=h.device).tril(total - new)
            return self.self_attn(h, k, v, mask, bias, two_pass)

        x = self.residual(x, self.self_norm, attend)
        x = self.residual(x, self.cross_norm, lambda h: self.cross_attn(
            h, source[0], source[1], source_mask, two_pass=two_pass,
            probabilities=probabilities, heads=heads))
        return self.residual(x, self.mlp_norm, lambda h: self.mlp(h, two_pass))


class Seq2Seq(nn.Module):
    """Built on the meta device; the loader assigns the weights."""

    def __init__(self, spec: Seq2SeqSpec, weights: str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.spec = spec
        hidden = spec.hidden_size
        self.embed = embedding(spec.vocab_size, hidden, weights, dtype)
        self.embed_scale = math.sqrt(hidden) if spec.scale_embedding else 1.0
        if spec.positions == "learned":
            table = spec.max_position_embeddings + spec.position_offset
            self.encoder_positions = nn.Embedding(table, hidden, dtype=dtype, device="meta")
            self.decoder_positions = nn.Embedding(table, hidden, dtype=dtype, device="meta")
        elif spec.positions == "relative":  # a bias per head and bucket, on each side
            self.encoder_relative = nn.Embedding(spec.relative_buckets, spec.num_heads,
                                                 dtype=dtype, device="meta")
            self.decoder_relative = nn.Embedding(spec.relative_buckets, spec.num_heads,
                                                 dtype=dtype, device="meta")
        else:  # the checkpoint's own tables replace these when it stores them (Marian)
            table = sinusoids(spec.max_position_embeddings + spec.position_offset, hidden,
                              spec.positions == "sinusoidal_interleaved").to(dtype)
            self.register_buffer("encoder_table", table, persistent=False)
            self.register_buffer("decoder_table", table.clone(), persistent=False)

        def norm():
            return spec.make_norm(dtype)

        self.encoder_embed_norm = norm() if spec.embedding_norm else None
        self.decoder_embed_norm = norm() if spec.embedding_norm else None
        self.encoder_layers = nn.ModuleList(Block(spec, weights, dtype, decoder=False)
                                            for _ in range(spec.encoder_layers))
        self.decoder_layers = nn.ModuleList(Block(spec, weights, dtype, decoder=True)
                                            for _ in range(spec.decoder_layers))
        self.encoder_norm = norm() if spec.final_norms else None
        self.decoder_norm = norm() if spec.final_norms else None
        self.lm_head = linear(hidden, spec.vocab_size, weights, dtype, bias=False)
        if spec.logits_bias:
            self.register_buffer("logits_bias", torch.empty(spec.vocab_size, dtype=dtype,
                                                            device="meta"))
        else:
            self.logits_bias = None

    def _positions(self, start: int | torch.Tensor, length: int,
                   decoder: bool) -> torch.Tensor | float:
        """Position embeddings of `length` tokens from `start` (an int, or one start per
        row: [B, length] then)."""
        if self.spec.positions == "relative":
            return 0.0  # positions enter as attention biases instead
        index = _query_positions(start, length) + self.spec.position_offset
        if self.spec.positions == "learned":
            table = self.decoder_positions if decoder else self.encoder_positions
            return table(index.to(table.weight.device))
        table = self.decoder_table if decoder else self.encoder_table
        return table[index.to(table.device)]

    def encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source ids [B, S] (right-padded) -> (states [B, S, H], key mask [B, 1, 1, S])."""
        keep = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        mask = keep[:, None, None, :]
        x = self.embed(ids) * self.embed_scale + self._positions(0, ids.shape[1], False)
        if self.encoder_embed_norm is not None:
            x = self.encoder_embed_norm(x)
        bias = self._relative_bias(0, ids.shape[1], ids.shape[1], decoder=False)
        for layer in self.encoder_layers:
            x = layer.encode(x, mask, bias)
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        return x, mask

    def _relative_bias(self, start: int | torch.Tensor, queries: int, keys: int,
                       decoder: bool) -> torch.Tensor | None:
        """T5: [1, heads, queries, keys] biases of queries at start.. over keys at 0..
        ([B, heads, queries, keys] for one start per row)."""
        if self.spec.positions != "relative":
            return None
        table = self.decoder_relative if decoder else self.encoder_relative
        device = table.weight.device
        query = _query_positions(start, queries).to(device).unsqueeze(-1)
        key = torch.arange(keys, device=device)
        buckets = relative_buckets(key - query, not decoder, self.spec.relative_buckets,
                                   self.spec.relative_max_distance)
        bias = table(buckets)  # [..., queries, keys, heads]
        return bias.movedim(-1, -3) if bias.dim() == 4 else bias.permute(2, 0, 1).unsqueeze(0)

    def cross_keys_values(self, states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values of the encoded source."""
        return [layer.cross_attn.keys_values(states) for layer in self.decoder_layers]

    def decode(self, ids: torch.Tensor, start: int | torch.Tensor, caches: list,
               cross: list[tuple[torch.Tensor, torch.Tensor]],
               source_mask: torch.Tensor, attention: list | None = None) -> torch.Tensor:
        """Target ids [B, T] at positions start..start+T-1 -> logits of the last [B, V]
        (float32). With an `attention` list, the alignment layer's cross-attention weights
        [B, T, S] are appended to it. `caches`: a dict per layer grown by concatenation
        (`start` an int), or the engine's slot views (`start` one position per row, [B])."""
        embedded = self.embed(ids) * self.embed_scale
        length = ids.shape[1]
        if self.spec.zero_start:
            if isinstance(start, int) and start == 0:
                embedded[:, 0] = 0
            elif not isinstance(start, int):
                first = (_query_positions(start, length) == 0).to(embedded.device)
                embedded = embedded.masked_fill(first.unsqueeze(-1), 0.0)
        x = embedded + self._positions(start, length, True)
        if self.decoder_embed_norm is not None:
            x = self.decoder_embed_norm(x)
        keys = start + length if isinstance(start, int) else caches[0].read
        bias = self._relative_bias(start, length, keys, decoder=True)
        aligned = self.spec.alignment_layer % len(self.decoder_layers)
        heads = self.spec.alignment_heads or self.spec.num_heads
        for index, (layer, cache, source) in enumerate(
                zip(self.decoder_layers, caches, cross, strict=True)):
            x = layer.decode(x, cache, source, source_mask, bias,
                             attention if index == aligned else None, heads)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        last = x[:, -1] * self.spec.output_scale if self.spec.output_scale != 1.0 else x[:, -1]
        logits = project(self.lm_head, last, ids.shape[1] > 1).float()
        return logits if self.logits_bias is None else logits + self.logits_bias.float()


def _query_positions(start: int | torch.Tensor, length: int) -> torch.Tensor:
    """Positions start..start+length-1: [length] for an int, [B, length] for one start per
    row."""
    if isinstance(start, int):
        return torch.arange(start, start + length)
    return start.view(-1, 1) + torch.arange(length, device=start.device)
