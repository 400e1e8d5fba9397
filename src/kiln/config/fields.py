"""The building blocks of the config schema: constrained value types, byte sizes, path marks
and the ``Section`` base class."""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


def _positive_int_or_auto(value: Any) -> Any:
    """One clear error for a count that may also be 'auto' (instead of one per union member)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError("a whole number >= 1 or 'auto'")


PositiveIntOrAuto = Annotated[
    PositiveInt | Literal["auto"], BeforeValidator(_positive_int_or_auto)
]

_BYTE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}  # fmt: skip
_BYTE_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)\s*")


def _byte_size_or_auto(value: Any) -> Any:
    """Bytes as a whole number or a string with a unit ("512MiB", "1.5GB"), or 'auto'."""
    if isinstance(value, str) and (match := _BYTE_SIZE.fullmatch(value)):
        value = round(float(match[1]) * _BYTE_UNITS[match[2]])
    elif isinstance(value, float) and value.is_integer():  # 1e9, as YAML writes large numbers
        value = int(value)
    try:
        return _positive_int_or_auto(value)
    except ValueError:
        raise ValueError(
            "a whole number of bytes >= 1, a size with a unit (B, KB, MB, GB, TB or KiB, MiB, "
            "GiB, TiB; e.g. 512MiB) or 'auto'"
        ) from None


ByteSizeOrAuto = Annotated[PositiveInt | Literal["auto"], BeforeValidator(_byte_size_or_auto)]


class FilePath:
    """Marks a str field as a file-system path: ``resolve_config`` makes a relative one absolute,
    so a run resumed from another folder reads the same files. ``keywords`` are the field's
    values that name something packaged rather than a path."""

    def __init__(self, *keywords: str) -> None:
        self.keywords = keywords


def type_parts(annotation: Any) -> list[Any]:
    """A field's type and everything inside it: union members, container origins and
    arguments, Annotated marks, Literal values."""
    parts = [annotation]
    origin = typing.get_origin(annotation)
    if origin is not None:
        parts.append(origin)
    for arg in typing.get_args(annotation):
        parts += type_parts(arg)
    return parts


def _takes_a_bool(annotation: Any) -> bool:
    return any(p is bool or isinstance(p, bool) for p in type_parts(annotation))


def _takes_a_number(annotation: Any) -> bool:
    return any(p is int or p is float for p in type_parts(annotation))


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true/false as 1/0 for numbers; `every_steps: false` would silently
        # mean 0 (no checkpoints), so a bool where a number belongs is an error.
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if _takes_a_number(annotation) and not _takes_a_bool(annotation):
                raise ValueError("a number, not true/false")
        return value
