"""How a Translator runs its model outside the engine (translation_engine.py, which decodes
translate_batch's sentences): one sentence streamed token by token (generate_tokens),
targets scored (score_batch), and the first step of `return_alternatives`."""

from __future__ import annotations

import torch

from .generation.sampling import choose_tokens


class Decoding:
    def __init__(self, model, device: torch.device) -> None:
        self.model, self.device, self.spec = model, device, model.spec

    def encode(self, ids: list[int]):
        """One source: (cross keys/values per decoder layer, source mask)."""
        tensor = torch.tensor([ids], device=self.device)
        lengths = torch.tensor([len(ids)], device=self.device)
        states, mask = self.model.encode(tensor, lengths)
        return self.model.cross_keys_values(states), mask

    @torch.inference_mode()
    def expand(self, source_ids: list[int], start: list[int], count: int, processors,
               history: list[int], end_ids: frozenset[int]) -> list[tuple[int, float]]:
        """return_alternatives' first free step: the `count` likeliest next tokens after the
        start and prefix (end tokens barred, as CTranslate2 does), with their log-probs."""
        cross, mask = self.encode(source_ids)
        caches = [{} for _ in self.model.decoder_layers]
        logits = self.model.decode(torch.tensor([start], device=self.device), 0, caches,
                                   cross, mask)
        if processors.active:
            logits = processors.apply(logits, [history])
        logits[:, sorted(end_ids)] = float("-inf")
        log_probs = logits.log_softmax(-1)[0, :self.spec.vocab_size]
        scores, ids = log_probs.topk(min(count, log_probs.shape[0]))
        return list(zip(ids.tolist(), scores.tolist(), strict=True))

    def start(self, request, source_ids):
        """Encode one source and run the decoder over its start token and target prefix:
        (cross keys/values, source mask, self-attention caches, next logits)."""
        cross, mask = self.encode(source_ids)
        caches = [{} for _ in self.model.decoder_layers]
        logits = self.model.decode(torch.tensor([request.prompt_ids], device=self.device), 0,
                                   caches, cross, mask)
        return cross, mask, caches, logits

    def stream(self, request, logits, caches, cross, mask, sampling, generator, end_ids,
               processors, position):
        """beam_size 1: one token per step (greedy, or a draw after top-k, temperature and
        top-p); yields (token, log_prob, is_end, is_last)."""
        tokens: list[int] = []
        for step in range(request.max_new_tokens):
            if processors.active:
                logits = processors.apply(logits, [request.returned_prompt + tokens])
            if step < request.min_new_tokens and end_ids:
                logits[:, sorted(end_ids)] = float("-inf")
            ids, log_probs = choose_tokens(logits, [(sampling, generator)],
                                           self.spec.vocab_size)
            token, log_prob = int(ids[0]), float(log_probs[0])
            is_end = token in end_ids
            is_last = is_end or step + 1 == request.max_new_tokens
            yield token, log_prob, is_end, is_last
            if is_last:
                return
            tokens.append(token)
            logits = self.model.decode(ids[:, None], position, caches, cross, mask)
            position += 1

    @torch.inference_mode()
    def target_log_probs(self, source_ids, inputs, targets) -> list[float]:
        cross, mask = self.encode(source_ids)
        caches = [{} for _ in self.model.decoder_layers]
        log_probs = []
        for position, token in enumerate(inputs):  # one position at a time, as decoding does
            logits = self.model.decode(torch.tensor([[token]], device=self.device), position,
                                       caches, cross, mask)
            log_probs.append(float(logits.log_softmax(-1)[0, targets[position]]))
        return log_probs
