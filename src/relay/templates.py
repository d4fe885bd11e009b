"""{{var}} and {{var ?? 'fallback'}} in subjects and bodies, filled from a `data` object;
values are HTML-escaped in HTML. A variable with no value and no fallback is an error."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Any

from .errors import ValidationError

_TAG = re.compile(r"\{\{\s*([A-Za-z_][\w.-]*)\s*(?:\?\?\s*'((?:[^'\\]|\\.)*)'\s*)?\}\}")


def render(text: str, data: Mapping[str, Any], *, escape: bool, param: str) -> str:
    if "{{" not in text:
        return text

    def fill(m: re.Match[str]) -> str:
        value = _lookup(data, m.group(1))
        if value is None:
            if m.group(2) is None:
                raise ValidationError(f"{param} uses {{{{{m.group(1)}}}}}, which data does not "
                                      "give (write {{name ?? 'fallback'}} for a default)",
                                      param=f"data.{m.group(1)}")
            value = re.sub(r"\\(.)", r"\1", m.group(2))
        text = value if isinstance(value, str) else _plain(value)
        return html.escape(text) if escape else text

    return _TAG.sub(fill, text)


def _lookup(data: Mapping[str, Any], path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
