"""Turn rows of common dataset shapes into chat conversations (lists of ``{"role", "content"}``).

Shapes (``format``):
- ``gsm8k``: ``question``, ``answer`` -> user = question, assistant = answer (worked solution with ``#### N``);
- ``alpaca``: ``instruction``, optional ``input``, ``output`` -> user = instruction (+ blank line + input),
  assistant = output;
- ``messages``: a ``messages`` list of ``{"role", "content"}`` dicts, passed through after validation.

Errors are ``MftBenchError`` without the source name; the loader prefixes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mft_bench.errors import MftBenchError

FORMATS = ("gsm8k", "alpaca", "messages")
ROLES = ("system", "user", "assistant")
# Fields that must be present and non-empty for each format (alpaca's "input" is optional).
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("question", "answer"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
}
MISSING_FIELDS_HINT = "rows lack 'question'/'answer' (gsm8k), 'instruction'/'output' (alpaca) or 'messages'"


def detect_format(row: Mapping[str, Any]) -> str:
    """The format whose fields ``row`` has; ``messages`` wins over ``gsm8k`` over ``alpaca``."""
    for fmt in ("messages", "gsm8k", "alpaca"):
        if all(key in row for key in REQUIRED_FIELDS[fmt]):
            return fmt
    raise MftBenchError(f"{MISSING_FIELDS_HINT}; found fields {sorted(row)}")


def _text(row: Mapping[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise MftBenchError(f"field '{key}' (needed by format '{fmt}') is missing or empty")
    return value.strip()


def _validate_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise MftBenchError("field 'messages' must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise MftBenchError(f"messages[{i}] needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise MftBenchError(f"messages[{i}] has role '{role}'; allowed roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise MftBenchError(f"messages[{i}] content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def to_messages(row: Mapping[str, Any], fmt: str) -> list[dict[str, str]]:
    """The conversation for one ``row`` of format ``fmt`` (``"auto"`` detects it from the row's fields)."""
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt == "gsm8k":
        return [
            {"role": "user", "content": _text(row, "question", fmt)},
            {"role": "assistant", "content": _text(row, "answer", fmt)},
        ]
    if fmt == "alpaca":
        prompt = _text(row, "instruction", fmt)
        extra = row.get("input")
        if isinstance(extra, str) and extra.strip():
            prompt += "\n\n" + extra.strip()
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output", fmt)}]
    if fmt == "messages":
        return _validate_messages(row.get("messages"))
    raise MftBenchError(f"unknown data format '{fmt}'; choose one of auto, {', '.join(FORMATS)}")
