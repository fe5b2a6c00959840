"""Generation: the engine (continuous batching over the KV slot pool) and everything it
runs: options and requests, the model runner, the searches (greedy/sampling, beam,
alternatives, scoring), sampling and logits processors, text streaming, and the
token-level API that Generator exposes."""
