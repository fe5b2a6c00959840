"""From what a caller asks to what the engine runs: a checked Request, the Search that turns
its logits into tokens, and (for text requests) the TextStream that decodes them."""

from __future__ import annotations

from collections.abc import Sequence as Tokens

import torch

from ..errors import RequestError
from .beam import BeamSearch
from .loaded_model import LoadedModel
from .options import GenerationOptions
from .requests import Request, RequestBuilder
from .search import Search, TokenSearch
from .text_stream import TextStream


class Intake:
    def __init__(self, loaded: LoadedModel, max_length: int, rng: torch.Generator,
                 has_draft: bool) -> None:
        self.loaded, self.max_length, self.rng, self.has_draft = loaded, max_length, rng, has_draft
        self.builder = RequestBuilder(loaded.spec, loaded.config.tokens, loaded.vocabulary,
                                      str(loaded.path))

    def request(self, prompt: Tokens[int | str], options: GenerationOptions) -> Request:
        """One prompt, checked against the model and the engine's slot length."""
        prompt_ids = self.builder.check_batch([prompt])[0]
        return self.builder.request(prompt_ids, options, self.builder.static_ids(options),
                                    self.max_length)

    def text_stream(self, request: Request, options: GenerationOptions,
                    skip_special_tokens: bool) -> TextStream:
        user_prompt = request.prompt_ids[request.static_length:]
        return TextStream(self.require_tokenizer(), user_prompt, options.stop_strings,
                          skip_special_tokens)

    def search_for(self, request: Request, options: GenerationOptions, end_ids=None,
                   processors=None, row: int = 0) -> Search:
        """The search a request runs with: beam search, or greedy/sampled decoding with the
        request's own random stream (`seed`, made distinct per row of a batch)."""
        builder = self.builder
        end_ids = builder.end_ids(options.end_token) if end_ids is None else end_ids
        processors = builder.processors(options) if processors is None else processors
        generator = self.rng
        if options.seed is not None:
            generator = torch.Generator(device=self.loaded.device)
            generator.manual_seed(row_seed(options.seed, row))
        usable = self.loaded.spec.usable_vocab_size
        if options.beam_size > 1:
            return BeamSearch(request, options.beam, options.sampling, generator, end_ids,
                              options.return_end_token, processors, usable)
        drafted = self.has_draft and options.use_draft_model and not options.prompt_lookup
        speculating = options.prompt_lookup or drafted
        return TokenSearch(request, options.sampling, generator, end_ids, options.return_end_token,
                           processors, options.return_logits_vocab, options.length_penalty,
                           options.top_logprobs,
                           options.num_speculative_tokens if speculating else 0,
                           options.adaptive_speculation, drafted)

    def require_tokenizer(self):
        if self.loaded.tokenizer is None:
            raise RequestError(f"{self.loaded.path} has no tokenizer.json, so text cannot be "
                               "encoded; pass token ids to generate_batch instead")
        return self.loaded.tokenizer


def row_seed(seed: int, row: int) -> int:
    """Row 0 uses the seed itself (so one prompt gives the same tokens alone or in a batch);
    other rows of a call get seeds of their own, derived from it (splitmix64)."""
    if row == 0:
        return seed
    value = (seed + row * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (value ^ (value >> 31)) & 0x7FFFFFFFFFFFFFFF
