"""Perplexity of a model on a text: the quality check beside every speed figure."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Perplexity:
    perplexity: float
    tokens: int  # tokens predicted (the first token of each window is only context)
    windows: int


def perplexity(generator, text: str, max_tokens: int | None = 2048,
               window: int | None = None) -> Perplexity:
    """exp(mean negative log-likelihood) of the text's first `max_tokens` tokens (None: all),
    in consecutive windows of `window` tokens (default: the model's context)."""
    ids = generator.require_tokenizer().encode(text)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 (one to predict from), got {max_tokens}")
        ids = ids[:max_tokens]
    context = generator.spec.max_position_embeddings
    window = min(window or context, context)
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if len(ids) < 2:
        raise ValueError("the text encodes to fewer than 2 tokens; perplexity needs more text")
    total_nll, predicted, windows = 0.0, 0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = generator.forward_batch([chunk])[0]
        total_nll += F.cross_entropy(logits[:-1], torch.tensor(chunk[1:], device=logits.device),
                                     reduction="sum").item()
        predicted += len(chunk) - 1
        windows += 1
    return Perplexity(math.exp(total_nll / predicted), predicted, windows)
