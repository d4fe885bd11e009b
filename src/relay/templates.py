"""{{var}} and {{var ?? 'fallback'}} in subjects and bodies, filled from a `data` object;
values are HTML-escaped in HTML. A variable with no value and no fallback is an error.
`render_stored` does the same for a stored template, for every API that names one."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from . import owners
from .compose import check_header_text
from .errors import ValidationError
from .types import Template

_TAG = re.compile(r"\{\{\s*([A-Za-z_][\w.-]*)\s*(?:\?\?\s*'((?:[^'\\]|\\.)*)'\s*)?\}\}")
# what one filled part may come to unless the caller says ([limits] max_message_size)
DEFAULT_LIMIT = 64 * 1024 * 1024


def render(text: str, data: Mapping[str, Any], *, escape: bool, param: str,
           header: bool = False, limit: int = DEFAULT_LIMIT) -> str:
    """`text` filled from `data`. In a header (a subject) a value may not break the line:
    refused naming the variable, as submit would refuse the filled subject anyway. The
    result may be at most `limit` characters: a large value used many times is refused
    (552) while it is being filled, before it takes the memory."""
    if "{{" not in text:
        return text
    made = [0, 0]  # characters of the result so far, and where in `text` it has got to

    def fill(m: re.Match[str]) -> str:
        value = _lookup(data, m.group(1))
        where = f"data.{m.group(1)}"
        if value is None:
            if m.group(2) is None:
                raise ValidationError(f"{param} uses {{{{{m.group(1)}}}}}, which data does not "
                                      "give (write {{name ?? 'fallback'}} for a default)",
                                      param=where)
            value, where = re.sub(r"\\(.)", r"\1", m.group(2)), param  # the template's own
        text = value if isinstance(value, str) else _plain(value)
        if header:
            check_header_text(text, where)
        out = html.escape(text) if escape else text
        made[0] += m.start() - made[1] + len(out)
        made[1] = m.end()
        if made[0] > limit:
            raise ValidationError(f"{param} filled from data would be over {limit} characters "
                                  "([limits] max_message_size)", param=param,
                                  smtp="552 5.3.4")
        return out

    return _TAG.sub(fill, text)


def tags(text: str) -> list[str]:
    """The variable names of the well-formed tags in `text`, in order."""
    return [m.group(1) for m in _TAG.finditer(text)]


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


class UnknownTemplate(ValidationError):
    """No stored template has the id given (an API answers 404)."""


class TemplateSource(Protocol):
    async def get_template(self, template_id: str) -> Template | None: ...


@dataclass(frozen=True, kw_only=True)
class Filled:
    """A template's parts with the variables filled in (or the caller's overrides)."""

    template: Template
    subject: str
    html: str
    text: str | None


async def render_stored(source: TemplateSource, template_id: str, data: Mapping[str, Any], *,
                        param: str = "templateId", subject: str | None = None,
                        html: str | None = None, text: str | None = None,
                        within: owners.Within = None, limit: int = DEFAULT_LIMIT) -> Filled:
    """Look the template up and fill its subject, html and text with `data`; a part given
    here replaces the template's own (a request's fields beat the template's). A template
    out of the caller's reach (`within`) is unknown to it."""
    found = await source.get_template(template_id)
    if found is None or not owners.sees(within, found.owner):
        raise UnknownTemplate(f"no template {template_id}", param=param)
    return fill(found, data, subject=subject, html=html, text=text, limit=limit)


def fill(t: Template, data: Mapping[str, Any], *, subject: str | None = None,
         html: str | None = None, text: str | None = None,
         limit: int = DEFAULT_LIMIT) -> Filled:
    body_text = text if text is not None else t.text
    return Filled(
        template=t,
        subject=render(subject if subject is not None else t.subject, data, escape=False,
                       param="subject", header=True, limit=limit),
        html=render(html if html is not None else t.html, data, escape=True, param="html",
                    limit=limit),
        text=render(body_text, data, escape=False, param="text", limit=limit)
        if body_text else None)
