"""Chat templates: render a conversation into the model's prompt format (jinja2, as the
model's tokenizer_config.json says), so the model sees exactly what it was tuned on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


def check_messages(messages: object) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or \
                message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise ValueError(f"message {index} must be {{'role': one of {ROLES}, 'content': str}},"
                             f" got {message!r}")
    return messages


@dataclass
class ChatTemplate:
    source: str
    special_tokens: dict[str, str]

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate | None:
        """The template of tokenizer_config.json or chat_template.jinja, if the model has one."""
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template:
            return None
        special = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token")}
        return cls(template, {key: value for key, value in special.items() if value})

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        environment.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent)
        try:
            return environment.from_string(self.source).render(
                messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                **self.special_tokens)
        except TemplateError as error:
            raise ValueError(f"the model's chat template rejected the conversation: {error}") \
                from error


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return value.get("content")
    return value if isinstance(value, str) else None
