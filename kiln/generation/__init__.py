"""Generation: sampling, logits processors, beam search, batching, the decode loops, the
tokenizer and chat templates, and the result types."""
