"""`kiln.Encoder`: BERT-family encoders for sentence embeddings and hidden states, with
CTranslate2's `Encoder.forward_batch` and a sentence-transformers `embed`.

    encoder = kiln.Encoder("sentence-transformers/all-MiniLM-L6-v2", compute_type="int8")
    vectors = encoder.embed(["A man is eating food.", "A man is riding a horse."])

The model is a Hugging Face folder or hub id (BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT;
MiniLM-style BERTs), quantized as it loads: a 22M-parameter encoder converts in well under a
second, so no folder is written. `embed` applies the pooling and normalization the model's
sentence-transformers files ask for (`modules.json`, `1_Pooling/config.json`,
`sentence_bert_config.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import seq_folder
from .conversion.archs.bert import encoder_spec, encoder_weights, is_encoder_type
from .conversion.formats.ctranslate2_encoder import CTranslate2Encoder, is_ctranslate2_encoder
from .conversion.formats.hf import read_config, tensor_source
from .model.encoder import Encoder as EncoderModel
from .model.encoder import EncoderSpec
from .model.loading import resolve_device
from .quant.compute_types import ComputeType, resolve
from .seq_folder import assemble, kiln_kind

POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens",
                 "weightedmean_tokens", "lasttoken")  # sentence-transformers' output order


@dataclass
class EncoderOutput:
    """As CTranslate2's EncoderForwardOutput: states [B, T, H] (rows past a sequence's length
    are padding), pooler_output [B, H] (None for models without a pooler), and lengths."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None
    lengths: torch.Tensor


@dataclass(frozen=True)
class Pooling:
    """How sentence-transformers turns token states into one vector."""

    modes: tuple[str, ...] = ("mean_tokens",)
    normalize: bool = False
    max_seq_length: int | None = None

    @classmethod
    def from_folder(cls, folder: Path) -> Pooling:
        """The folder's sentence-transformers pipeline; mean pooling without one."""
        modules_file = folder / "modules.json"
        if not modules_file.is_file():
            return cls()
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        modes, normalize = ("mean_tokens",), False
        for module in modules:
            kind = module.get("type", "").rsplit(".", 1)[-1]
            if kind == "Pooling":
                config = json.loads((folder / module["path"] / "config.json").read_text())
                modes = tuple(mode for mode in POOLING_MODES if config.get(f"pooling_mode_{mode}"))
                if not modes:
                    raise ValueError(f"{folder}: the Pooling module sets no pooling mode kiln "
                                     f"knows ({', '.join(POOLING_MODES)})")
            elif kind == "Normalize":
                normalize = True
            elif kind != "Transformer":
                raise ValueError(f"{folder}: the sentence-transformers module {kind!r} is not "
                                 "supported by kiln (Transformer, Pooling and Normalize are)")
        settings = folder / "sentence_bert_config.json"
        length = (json.loads(settings.read_text()).get("max_seq_length")
                  if settings.is_file() else None)
        return cls(modes, normalize, length)

    def __call__(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(states.shape[1], device=states.device)
        keep = (steps[None, :] < lengths[:, None]).unsqueeze(-1).to(states.dtype)  # [B, T, 1]
        counts = lengths.clamp(min=1).to(states.dtype)[:, None]
        parts = []
        for mode in self.modes:
            if mode == "cls_token":
                parts.append(states[:, 0])
            elif mode == "max_tokens":
                parts.append(states.masked_fill(keep == 0, -1e9).amax(dim=1))
            elif mode == "mean_tokens":
                parts.append((states * keep).sum(dim=1) / counts)
            elif mode == "mean_sqrt_len_tokens":
                parts.append((states * keep).sum(dim=1) / counts.sqrt())
            elif mode == "weightedmean_tokens":
                weights = keep * (steps + 1).to(states.dtype)[None, :, None]
                parts.append((states * weights).sum(dim=1) / weights.sum(dim=1))
            else:  # lasttoken
                parts.append(states[torch.arange(states.shape[0]), lengths - 1])
        pooled = torch.cat(parts, dim=-1)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


class Encoder:
    """A BERT-family encoder on CPU or CUDA, in any compute type kiln runs."""

    def __init__(self, model_path: str | Path, device: str = "cpu", *, device_index: int = 0,
                 compute_type: str = "default", revision: str | None = None,
                 hub_cache_dir: str | Path | None = None, local_files_only: bool = False,
                 token: str | bool | None = None, max_batch_tokens: int = 16384) -> None:
        folder = _folder(model_path, revision, hub_cache_dir, local_files_only, token)
        self.path = folder
        self.device = resolve_device(device, device_index)
        self.spec, saved, weights, tokens = open_encoder(folder)
        # token strings without a tokenizer.json (CTranslate2 and kiln folders)
        self.vocabulary = ({token: index for index, token in enumerate(tokens)}
                           if tokens is not None else None)
        self.compute_type = resolve(compute_type, saved, self.device)
        if self.compute_type.weights == "int4":
            raise ValueError("int4 is not offered for encoders (they are small and bound by "
                             "compute, not memory); use int8 or a float type")
        self.model = assemble(EncoderModel(self.spec, self.compute_type.weights,
                                           self.compute_type.torch_dtype),
                              weights, self.compute_type, self.device)
        self.pooling = Pooling.from_folder(folder)
        limit = self.spec.max_length
        self.max_length = min(limit, self.pooling.max_seq_length or limit)
        self.tokenizer = _tokenizer(folder)
        if self.tokenizer is not None:
            self.tokenizer.enable_truncation(self.max_length)
            self.tokenizer.no_padding()
        self.max_batch_tokens = max_batch_tokens

    # ------------------------------------------------------------ CTranslate2's API

    def forward_batch(self, inputs: list[list[str]] | list[list[int]] | torch.Tensor,
                      lengths: list[int] | torch.Tensor | None = None,
                      token_type_ids: list[list[int]] | torch.Tensor | None = None
                      ) -> EncoderOutput:
        """Token strings or ids per sequence (or an id tensor [B, T] with `lengths`):
        hidden states and pooler output, as CTranslate2's Encoder.forward_batch."""
        ids, lengths_tensor, types = self._batch(inputs, lengths, token_type_ids)
        with torch.inference_mode():
            states, pooled = self.model(ids, lengths_tensor, types)
        return EncoderOutput(states.float(), None if pooled is None else pooled.float(),
                             lengths_tensor)

    # ------------------------------------------------------------ sentence embeddings

    def embed(self, texts: str | list[str], batch_size: int = 32,
              normalize: bool | None = None) -> torch.Tensor:
        """Sentence embeddings [N, D] (float32, on the CPU), pooled and normalized as the
        model's sentence-transformers files say (`normalize` overrides)."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        result = self.embed_ids(self.tokenize(texts), batch_size, normalize)
        return result[0] if single else result

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, special tokens included and cut at the model's max_length, as
        sentence-transformers tokenizes (single-segment: every token type is 0)."""
        self._require_tokenizer()
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {index} is a {type(text).__name__}, not a str")
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]

    def embed_ids(self, rows: list[list[int]], batch_size: int = 32,
                  normalize: bool | None = None) -> torch.Tensor:
        """Sentence embeddings [N, D] of token id sequences, taken as given (no special
        tokens added)."""
        pooling = self.pooling if normalize is None else Pooling(
            self.pooling.modes, normalize, self.pooling.max_seq_length)
        # Batches of similar lengths waste less on padding; the order is restored after.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        vectors: list[torch.Tensor | None] = [None] * len(rows)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            output = self.forward_batch([rows[i] for i in chosen])
            pooled = pooling(output.last_hidden_state, output.lengths).cpu()
            for row, index in enumerate(chosen):
                vectors[index] = pooled[row]
        return torch.stack(vectors) if vectors else torch.empty(0, self.spec.hidden_size)

    def encode_texts(self, texts: list[str]) -> dict[str, list[list[int]]]:
        """input_ids, attention_mask and token_type_ids, as a Hugging Face tokenizer gives them
        (unpadded)."""
        self._require_tokenizer()
        encodings = self.tokenizer.encode_batch(list(texts))
        return {"input_ids": [e.ids for e in encodings],
                "attention_mask": [e.attention_mask for e in encodings],
                "token_type_ids": [e.type_ids for e in encodings]}

    # ------------------------------------------------------------ helpers

    def _require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json, so kiln cannot tokenize text; "
                             "copy the model's tokenizer.json into it (ct2-transformers-converter "
                             "--copy_files tokenizer.json), or give forward_batch tokens or ids")

    def _batch(self, inputs, lengths, token_type_ids):
        if isinstance(inputs, torch.Tensor):
            if lengths is None:
                raise ValueError("an id tensor needs lengths (one per row)")
            ids = inputs.to(self.device, torch.long)
            lengths_tensor = torch.as_tensor(lengths, device=self.device, dtype=torch.long)
        else:
            rows = [self._ids(row, index) for index, row in enumerate(inputs)]
            if not rows:
                raise ValueError("forward_batch needs at least one sequence")
            width = max(len(row) for row in rows)
            ids = torch.full((len(rows), width), self.spec.pad_token_id, dtype=torch.long)
            for index, row in enumerate(rows):
                ids[index, :len(row)] = torch.tensor(row, dtype=torch.long)
            ids = ids.to(self.device)
            lengths_tensor = torch.tensor([len(row) for row in rows], device=self.device)
        if ids.shape[1] > self.spec.max_length:
            raise ValueError(f"a sequence has {ids.shape[1]} tokens; this model takes at most "
                             f"{self.spec.max_length}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.spec.vocab_size - 1}")
        types = None
        if token_type_ids is not None and self.spec.type_vocab_size:
            if isinstance(token_type_ids, torch.Tensor):
                types = token_type_ids.to(self.device, torch.long)
            else:
                types = torch.zeros_like(ids)
                for index, row in enumerate(token_type_ids):
                    types[index, :len(row)] = torch.tensor(row, dtype=torch.long)
            if int(types.max()) >= self.spec.type_vocab_size:
                raise ValueError(f"token type ids must be below {self.spec.type_vocab_size}")
        return ids, lengths_tensor, types

    def _ids(self, row, index: int) -> list[int]:
        row = list(row)
        if not row:
            raise ValueError(f"sequence {index} is empty")
        if all(isinstance(token, str) for token in row):
            lookup = (self.tokenizer.token_to_id if self.tokenizer is not None
                      else self.vocabulary.get)
            ids = [lookup(token) for token in row]
            unknown = [token for token, token_id in zip(row, ids, strict=True) if token_id is None]
            if unknown:
                raise ValueError(f"sequence {index}: tokens not in the vocabulary: {unknown[:5]}")
            return ids
        if all(isinstance(token, int) and not isinstance(token, bool) for token in row):
            return row
        raise TypeError(f"sequence {index} must hold token strings or ids, not a mix")


def open_encoder(folder: Path):
    """(spec, saved compute type, (kiln name, tensor) pairs, token strings or None) of a kiln
    encoder folder, a CTranslate2 encoder folder or a Hugging Face checkpoint."""
    kind = kiln_kind(folder)
    if kind == "encoder":
        return seq_folder.open_stored(folder, EncoderSpec, "vocabulary")
    if kind is not None:
        raise ValueError(f"{folder} holds a kiln {kind}; load it with kiln.Translator")
    if is_ctranslate2_encoder(folder):
        checkpoint = CTranslate2Encoder(folder)
        spec = checkpoint.spec()
        saved = "float16" if checkpoint.model.tensor(
            "encoder/layernorm_embedding/gamma").dtype == torch.float16 else "float32"
        return spec, ComputeType(None, saved), checkpoint.weights(spec), checkpoint.tokens
    config = read_config(folder)
    if not is_encoder_type(config.get("model_type")):
        raise ValueError(f"{folder} is a {config.get('model_type')!r} model, not a BERT-family "
                         "encoder; load decoders with kiln.Generator")
    spec = encoder_spec(config)
    return (spec, seq_folder.checkpoint_compute(config),
            encoder_weights(spec, tensor_source(folder)), None)


def convert_encoder(source: Path, output: Path, quantization: str | None = None,
                    force: bool = False, origin: dict | None = None) -> Path:
    """A kiln encoder folder from a Hugging Face checkpoint or a CTranslate2 folder."""
    spec, saved, pairs, tokens = open_encoder(Path(source))
    compute = ComputeType.parse(quantization or saved.name, saved.dtype)
    if compute.weights == "int4":
        raise ValueError("int4 is not offered for encoders; use int8")
    tokenizer = _tokenizer(Path(source))
    if tokens is None and tokenizer is not None:
        mapping = tokenizer.get_vocab(with_added_tokens=True)
        by_id = {index: token for token, index in mapping.items()}
        tokens = [by_id.get(index, "") for index in range(spec.vocab_size)]
    return seq_folder.write(output, "encoder", EncoderModel, spec, pairs, compute,
                            Path(source), {"vocabulary": tokens} if tokens else {}, force,
                            origin)


def _folder(model_path, revision, hub_cache_dir, local_files_only, token) -> Path:
    path = Path(model_path)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub ids; {path} is a local path")
        return path
    from .sources.hub import HUB_ID, download

    if not HUB_ID.match(str(model_path)):
        raise FileNotFoundError(f"no model folder at {model_path} (and it is not a hub id)")
    folder = download(str(model_path), revision, hub_cache_dir, local_files_only, token, None)
    return folder


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer as FastTokenizer

    path = folder / "tokenizer.json"
    return FastTokenizer.from_file(str(path)) if path.is_file() else None
