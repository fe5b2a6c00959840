"""The server's logging: text for people, or one JSON object per line for log pipelines
(`kiln serve --log-format json`), for kiln's own records and uvicorn's alike."""

from __future__ import annotations

import json
import logging
import time

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", ...the record's fields, "exception"}."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    if log_format not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter("%(levelname)s:     %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's records go through the same handler
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
