"""Stored templates in the SQLite store."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from .. import owners
from ..owners import Within
from ..types import Template
from .thread import DbThread

_FIELDS = tuple(f.name for f in fields(Template))
_COLUMNS = ", ".join(_FIELDS)
_EDITABLE = frozenset(_FIELDS) - {"id", "created_at", "owner"}


class TemplateQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def add_template(self, t: Template) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute(f"INSERT INTO templates ({_COLUMNS}) VALUES"
                       f" ({','.join('?' * len(_FIELDS))})",
                       tuple(_stored(t, name) for name in _FIELDS))

        await self._write(op)

    async def get_template(self, template_id: str) -> Template | None:
        def op(db: sqlite3.Connection) -> Template | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM templates WHERE id = ?",
                             (template_id,)).fetchone()
            return _template(row) if row else None

        found: Template | None = await self._reader.run(op)
        return found

    async def list_templates(self, *, limit: int = 100, after: str | None = None,
                             within: Within = None) -> list[Template]:
        """Oldest first; `after` is the id of the last template of the previous page;
        `within` a caller's reach."""
        def op(db: sqlite3.Connection) -> list[Template]:
            clause, args = owners.owner_sql(within)
            sql = f"SELECT {_COLUMNS} FROM templates WHERE {clause}"
            if after:
                sql += (" AND (created_at, id) >"
                        " (SELECT created_at, id FROM templates WHERE id = ?)")
                args.append(after)
            rows = db.execute(sql + " ORDER BY created_at, id LIMIT ?", (*args, limit))
            return [_template(r) for r in rows]

        found: list[Template] = await self._reader.run(op)
        return found

    async def update_template(self, template_id: str, changes: dict[str, Any]
                              ) -> Template | None:
        """Sets the given columns (and updated_at); the template as it is now, or None."""
        unknown = set(changes) - _EDITABLE
        if unknown:
            raise ValueError(f"not editable: {', '.join(sorted(unknown))}")

        def op(db: sqlite3.Connection) -> Template | None:
            if changes:
                names = list(changes)
                db.execute(f"UPDATE templates SET {', '.join(f'{n} = ?' for n in names)}"
                           " WHERE id = ?", (*(changes[n] for n in names), template_id))
            row = db.execute(f"SELECT {_COLUMNS} FROM templates WHERE id = ?",
                             (template_id,)).fetchone()
            return _template(row) if row else None

        found: Template | None = await self._write(op)
        return found

    async def delete_template(self, template_id: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM templates WHERE id = ?",
                              (template_id,)).rowcount == 1

        done: bool = await self._write(op)
        return done


def _stored(t: Template, name: str) -> Any:
    return owners.encode(t.owner) if name == "owner" else getattr(t, name)


def _template(row: tuple[Any, ...]) -> Template:
    values = dict(zip(_FIELDS, row, strict=True))
    values["owner"] = owners.decode(values["owner"])
    return Template(**values)
