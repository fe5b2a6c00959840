"""One adapter per engine: import it, load a folder, generate exactly N greedy tokens per prompt.

Every adapter takes the same token ids and returns how many tokens each prompt got, so the
worker times all engines through one code path. Imports happen inside `load` so the worker
can time them and a CTranslate2 worker never pays for importing torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class KilnEngine:
    def load(self, folder: str, compute_type: str, threads: int, device: str) -> tuple[float, float]:
        start = time.perf_counter()
        from kiln.generator import Generator

        imported = time.perf_counter()
        self.generator = Generator(folder, device=device, compute_type=compute_type,
                                   intra_threads=threads)
        self.compute_type = self.generator.compute_type
        self.int8_backend = self.generator.int8_backend
        return imported - start, time.perf_counter() - imported

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[int]:
        results = self.generator.generate_batch(
            prompts, max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
            include_prompt_in_result=False)
        return [len(result.sequences_ids[0]) for result in results]

    def peak_device_bytes(self) -> int | None:
        return _torch_peak_device_bytes()


class CTranslate2Engine:
    def load(self, folder: str, compute_type: str, threads: int, device: str) -> tuple[float, float]:
        start = time.perf_counter()
        import ctranslate2

        imported = time.perf_counter()
        self.generator = ctranslate2.Generator(folder, device=device, compute_type=compute_type,
                                               intra_threads=threads, inter_threads=1)
        self.compute_type = self.generator.compute_type
        loaded = time.perf_counter()
        self.vocabulary = _ct2_vocabulary(Path(folder))
        return imported - start, loaded - imported

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[int]:
        tokens = [[self.vocabulary[token] for token in prompt] for prompt in prompts]
        results = self.generator.generate_batch(
            tokens, max_length=new_tokens, min_length=new_tokens, sampling_topk=1, beam_size=1,
            include_prompt_in_result=False)
        return [len(result.sequences_ids[0]) for result in results]

    def peak_device_bytes(self) -> int | None:
        return None  # CTranslate2 does not report it


def _ct2_vocabulary(folder: Path) -> list[str]:
    """Token strings by id, as the converted folder holds them."""
    if (folder / "vocabulary.json").is_file():
        return json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
    return (folder / "vocabulary.txt").read_text(encoding="utf-8").split("\n")


class TransformersEngine:
    def load(self, folder: str, compute_type: str, threads: int, device: str) -> tuple[float, float]:
        start = time.perf_counter()
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        imported = time.perf_counter()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, compute_type)).to(device).eval()
        self.compute_type = str(self.model.dtype).removeprefix("torch.")
        config = self.model.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        return imported - start, time.perf_counter() - imported

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[int]:
        torch = self.torch
        ids = torch.tensor(prompts, device=self.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=self.pad_id)
        output = output.cpu()  # waits for the device
        return [output.shape[1] - ids.shape[1]] * len(prompts)

    def peak_device_bytes(self) -> int | None:
        return _torch_peak_device_bytes()


def _torch_peak_device_bytes() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None


ENGINES = {"kiln": KilnEngine, "ctranslate2": CTranslate2Engine, "transformers": TransformersEngine}
