"""A faster __init__ for the frozen dataclasses made for every message (types.py,
store/base.py): dataclasses' own calls object.__setattr__ once a field under frozen=True,
twice the cost of filling the instance's dict at once."""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING
from typing import Any, TypeVar

T = TypeVar("T")
_GIVEN = object()  # the default of a default_factory field: not given


def quick_init(cls: type[T]) -> type[T]:
    """A frozen keyword-only dataclass's __init__, filling the instance's dict at once: the
    one frozen=True makes calls object.__setattr__ a field, twice the cost in the classes
    made per message. Still frozen (an assignment raises FrozenInstanceError)."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if not all(f.kw_only and f.init for f in fields) or hasattr(cls, "__post_init__"):
        raise TypeError(f"quick_init cannot make {cls.__name__}'s __init__")
    names: dict[str, Any] = {"_GIVEN": _GIVEN}
    args, body = [], []
    for f in fields:
        names[f"_{f.name}"] = f.default if f.default_factory is MISSING else f.default_factory
        made = f.default_factory is not MISSING  # made when not given: _name()
        args.append(f.name if f.default is MISSING and not made
                    else f"{f.name}=_GIVEN" if made else f"{f.name}=_{f.name}")
        body.append(f"d[{f.name!r}] = _{f.name}() if {f.name} is _GIVEN else {f.name}"
                    if made else f"d[{f.name!r}] = {f.name}")
    source = f"def __init__(self, *, {', '.join(args)}):\n d = self.__dict__\n " + \
        "\n ".join(body)
    exec(source, names)  # noqa: S102 (the class's own field names, as dataclasses does)
    cls.__init__ = names["__init__"]  # type: ignore[misc]
    return cls
