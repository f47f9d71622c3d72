"""Configuration errors, and pydantic's validation errors said as one line per field, with what is allowed."""

from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import BaseModel, Tag, ValidationError


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what is allowed."""


def describe_validation_error(error: ValidationError, model: type[BaseModel], heading: str = "invalid config",
                              prefix: str = "") -> str:
    """`model` is the one validated; `prefix` is where it sits in the whole config (`recipe.options.`)."""
    lines = []
    for item in error.errors():
        shown, _ = _walk(model, item["loc"])
        field = prefix + (".".join(shown) or "config")
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field"
            _, parent = _walk(model, item["loc"][:-1])
            if parent is not None:
                message += f"; allowed: {', '.join(parent.model_fields)}"
        elif item["type"] == "literal_error":
            message = f"{message} (got {item.get('input')!r})"
        elif item["type"] == "value_error":
            message = str(item["ctx"]["error"])
        lines.append(f"{field}: {message}")
    return f"{heading}:\n  " + "\n  ".join(lines)


def _shown(part: Any) -> str:
    """A field name as typed, or quoted when it is empty or holds anything unusual (a newline, a dot, a colon)."""
    return str(part) if re.fullmatch(r"[\w-]+", str(part)) else repr(part)


def _walk(model: type[BaseModel], loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """The path as the user wrote it, and the model at its end (None past a plain value). pydantic puts the tag
    of a tagged union (`recipe.digits.options`) in the path; the user never typed it, so it is left out."""
    shown: list[str] = []
    current: type[BaseModel] | None = model
    tags: dict[str, type[BaseModel]] | None = None
    for part in loc:
        if tags is not None and str(part) in tags:
            current, tags = tags[str(part)], None
            continue
        shown.append(_shown(part))
        field = current.model_fields.get(str(part)) if current is not None else None
        annotation = getattr(field, "annotation", None)
        tags = _union_tags(annotation)
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return shown, current


def _union_tags(annotation: Any) -> dict[str, type[BaseModel]] | None:
    if typing.get_origin(annotation) is not typing.Union:
        return None
    tags = {}
    for member in typing.get_args(annotation):
        if typing.get_origin(member) is typing.Annotated:
            cls, *metadata = typing.get_args(member)
            tags.update({m.tag: cls for m in metadata if isinstance(m, Tag)})
    return tags or None
