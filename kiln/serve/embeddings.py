"""POST /v1/embeddings: an encoder model (kiln.Encoder) behind OpenAI's embeddings API.

Inputs are a string, a list of strings, a list of token ids or a list of such lists (ids are
embedded as given: no special tokens are added). Text is tokenized and cut at the model's
length as sentence-transformers does; token ids longer than that are refused. Vectors come
pooled and normalized as the model's sentence-transformers files say, as float lists or as
base64 of little-endian float32 (`encoding_format`).

One worker thread runs the encoder. Requests that arrive while it works wait in a queue and
are embedded together in its next batch (up to `max_batch_tokens` tokens), so concurrent
clients share the model's batched speed; a request whose client left before its batch
started is dropped.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, model_validator

from .api_errors import RETRY_AFTER_SECONDS, APIError, bad_request
from .lifecycle import ServedModel
from .limits import ServeLimits
from .metrics import ServerMetrics
from .protocol import IGNORED_FIELDS, _refuse_unknown

log = logging.getLogger("kiln.serve")
DEFAULT_BATCH_TOKENS = 8192  # per forward pass
MAX_BATCH_INPUTS = 512  # inputs of the requests one batch takes together


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are refused below

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data):
        return _refuse_unknown(cls, data, IGNORED_FIELDS, "")

    def inputs(self) -> tuple[list[str] | None, list[list[int]] | None]:
        """(texts, None) or (None, id rows)."""
        given = self.input
        if isinstance(given, str):
            return [given], None
        if not given:
            raise bad_request("input is empty; give a string, strings or token ids", "input")
        if isinstance(given[0], str):
            return list(given), None
        if isinstance(given[0], int):
            return None, [list(given)]
        return None, [list(row) for row in given]


@dataclass
class _Job:
    texts: list[str] | None
    ids: list[list[int]] | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return len(self.texts if self.texts is not None else self.ids)

    def settle(self, result=None, error: BaseException | None = None) -> None:
        def apply() -> None:
            if self.future.done():  # cancelled: the client left
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        self.loop.call_soon_threadsafe(apply)


class EmbeddingService(ServedModel):
    """An encoder behind /v1/embeddings, with a batching worker thread."""

    def __init__(self, load, served_model_name: str, *, limits: ServeLimits | None = None,
                 max_batch_tokens: int = DEFAULT_BATCH_TOKENS) -> None:
        super().__init__(load, served_model_name, limits=limits)
        self.max_batch_tokens = max_batch_tokens
        self.encoder = None
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.running = 0  # requests in the worker's batch
        self.metrics = ServerMetrics(lambda: self)
        self.inputs_embedded = Counter("kiln_embedding_inputs", "Inputs embedded",
                                       registry=self.metrics.registry)
        self._worker: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        """Requests queued, not yet in a batch."""
        return self.jobs.qsize()

    def _loaded(self, encoder) -> None:
        self.encoder = encoder
        self.model_path = encoder.path
        self._worker = threading.Thread(target=self._work, name="kiln-embed", daemon=True)
        self._worker.start()
        log.info("serving the encoder %s as %r (POST /v1/embeddings)", encoder.path,
                 self.served_model_name)

    def _alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def close(self) -> None:
        if self._worker is not None:
            self.jobs.put(None)
            self._worker.join(timeout=10)

    def model_card(self) -> dict:
        return {"id": self.served_model_name, "object": "model", "created": self.started,
                "owned_by": "kiln", "root": str(self.model_path),
                "max_model_len": self.encoder.max_length,
                "embedding_dimensions": self.encoder.spec.hidden_size}

    # ------------------------------------------------------------ the other endpoints

    async def admit_completion(self, request, client: str = ""):
        self._not_a_generator()

    async def admit_chat(self, request, client: str = ""):
        self._not_a_generator()

    def _not_a_generator(self):
        self.check_ready()
        raise bad_request(f"{self.served_model_name!r} is an embedding model: it answers POST "
                          "/v1/embeddings; serve a text-generation model for completions",
                          "model", code="wrong_endpoint")

    # ------------------------------------------------------------ /v1/embeddings

    async def embed(self, request: EmbeddingRequest) -> dict:
        self.check_ready()
        self.check_model(request.model)
        texts, ids = request.inputs()
        self._check(request, texts, ids)
        if self.waiting >= self.limits.max_queue:
            raise APIError(429, f"the server is busy ({self.waiting} requests queued, at most "
                                f"{self.limits.max_queue}, kiln serve --max-queue); retry later",
                           "rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        loop = asyncio.get_running_loop()
        job = _Job(texts, ids, loop.create_future(), loop)
        self.jobs.put(job)
        vectors, tokens = await job.future  # a client gone cancels it: the worker skips it
        self.metrics.e2e.observe(time.perf_counter() - job.arrived)
        return self._answer(request, vectors, tokens)

    def _check(self, request: EmbeddingRequest, texts, ids) -> None:
        limits, encoder = self.limits, self.encoder
        count = len(texts if texts is not None else ids)
        if count > limits.max_embedding_inputs:
            raise bad_request(f"input holds {count} items; the server allows "
                              f"{limits.max_embedding_inputs} per request (kiln serve "
                              "--max-embedding-inputs)", "input", code="too_many_inputs")
        if texts is not None:
            characters = sum(len(text) for text in texts)
            if characters > limits.max_prompt_chars:
                raise bad_request(f"input holds {characters} characters; the server allows "
                                  f"{limits.max_prompt_chars} per request (kiln serve "
                                  "--max-prompt-chars)", "input", code="prompt_too_long")
            for index, text in enumerate(texts):
                if not text:
                    raise bad_request(f"input {index} is an empty string", "input")
        else:
            vocab = encoder.spec.vocab_size
            for index, row in enumerate(ids):
                if not row:
                    raise bad_request(f"input {index} holds no token ids", "input")
                if len(row) > encoder.max_length:
                    raise bad_request(f"input {index} has {len(row)} tokens; this model takes "
                                      f"at most {encoder.max_length}", "input",
                                      code="context_length_exceeded")
                if any(not 0 <= token < vocab for token in row):
                    raise bad_request(f"input {index} holds token ids outside the vocabulary "
                                      f"(0..{vocab - 1})", "input")
        if request.dimensions is not None and request.dimensions != encoder.spec.hidden_size:
            raise bad_request(f"dimensions={request.dimensions}: this model's embeddings have "
                              f"{encoder.spec.hidden_size} dimensions and it was not trained to "
                              "be cut shorter; leave dimensions out", "dimensions")

    def _answer(self, request: EmbeddingRequest, vectors, tokens: int) -> dict:
        if request.encoding_format == "base64":
            values = [base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
                      for vector in vectors]
        else:
            values = vectors.tolist()
        return {"object": "list", "model": self.served_model_name,
                "data": [{"object": "embedding", "index": index, "embedding": value}
                         for index, value in enumerate(values)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ------------------------------------------------------------ the worker thread

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch = [job]
            inputs = job.size
            while inputs < MAX_BATCH_INPUTS:  # take what else is waiting
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                batch.append(job)
                inputs += job.size
            self.running = len(batch)
            try:
                self._run(batch)
            finally:
                self.running = 0

    def _run(self, batch: list[_Job]) -> None:
        now = time.perf_counter()
        live = []
        for job in batch:
            if job.future.cancelled():
                continue
            self.metrics.queue_wait.observe(now - job.arrived)
            if now - job.arrived > self.limits.queue_timeout:
                job.settle(error=APIError(
                    503, f"the request waited over {self.limits.queue_timeout:g} s for the "
                         "encoder (kiln serve --queue-timeout); retry later",
                    "service_unavailable", code="queue_timeout",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)}))
                continue
            live.append(job)
        if not live:
            return
        try:
            per_job = [job.ids if job.ids is not None else self.encoder.tokenize(job.texts)
                       for job in live]
            rows = [row for ids in per_job for row in ids]
            vectors = self.encoder.embed_ids(rows, batch_size=self._batch_rows(rows))
        except Exception as error:  # noqa: BLE001 - each request answers 500 with its id
            log.exception("embedding a batch of %d requests failed", len(live))
            for job in live:
                job.settle(error=error)
            return
        start = 0
        for job, ids in zip(live, per_job, strict=True):
            tokens = sum(len(row) for row in ids)
            job.settle((vectors[start:start + len(ids)], tokens))
            start += len(ids)
            self.metrics.prompt_tokens.inc(tokens)
            self.inputs_embedded.inc(len(ids))

    def _batch_rows(self, rows: list[list[int]]) -> int:
        """Rows per forward pass: as many as fit `max_batch_tokens` at the longest length."""
        longest = max(len(row) for row in rows)
        return max(1, self.max_batch_tokens // longest)
