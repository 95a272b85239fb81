"""A fast proof that the fhir.resources R4B models would accept a JSON object, without building them.

Building the models costs about two thirds of a valid Bundle's validation, almost all of it in the
library's Python hooks run on every element. Yet a valid Bundle's models find nothing. So `base.py`
asks this module first: `surely_valid(klass, data)` walks the JSON against an element table read
once from the models' own field declarations (names, arrays, element types, required elements,
choice groups) and checks each primitive as the model's type does (the same regular expressions and
bounds for strings, codes, ids and numbers; the type's own pydantic validator for dates, instants,
times, urls, uuids and base64). It answers True only when every element is of a shape it knows to
pass; anything else (an unknown key, a null, an empty object, a value of an unusual type, a
`fhir_comments`, a choice given twice) is "not sure", and the models then run and say what they say.
So the findings are the models' findings, exactly; only a valid Bundle gets cheaper
(`tests/unit/validator/test_prescreen.py` holds the two to agreement on hostile JSON).
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Final

from fhir_core import constraints
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from fhir_core.types import (
    Canonical,
    Code,
    Date,
    DateTime,
    Decimal,
    FhirBase,
    FhirElementOrResourceBase,
    Id,
    Instant,
    Integer,
    Markdown,
    Oid,
    String,
    Uri,
)
from pydantic import TypeAdapter, ValidationError

Check = Callable[[Any], bool]

# Kinds of element in the table.
PRIMITIVE, MODEL, RESOURCE, UNSURE = 0, 1, 2, 3


class Table:
    """What one model class accepts: JSON key → (kind, is an array, checker or class, choice group), and its rules."""

    __slots__ = ("fields", "primitive_extension", "required", "required_choices", "resource_type")

    def __init__(self, klass: type[FHIRAbstractModel]) -> None:
        blank = klass.model_construct()
        aliases = {name: info.alias or name for name, info in klass.model_fields.items()}
        group: dict[str, int] = {}
        required_choices: list[int] = []
        for g, names in enumerate(blank.get_one_of_many_fields().values()):
            group.update((aliases[n], g) for n in names)
            extra = klass.model_fields[names[0]].json_schema_extra
            if isinstance(extra, dict) and extra.get("one_of_many_required") is True:
                required_choices.append(g)
        fields: dict[str, tuple[int, bool, Any, int]] = {}
        for name, info in klass.model_fields.items():
            if name == "fhir_comments":
                continue  # a comment is rare and lax in the models: let them judge it
            alias = aliases[name]
            fields[alias] = (*_element(info.annotation), group.get(alias, -1))
        self.fields = fields
        required = [name for name, info in klass.model_fields.items() if info.is_required()]
        required += [name for name, _ in blank.get_required_fields() if name not in required]
        self.required = tuple(aliases[name] for name in required)
        self.required_choices = tuple(required_choices)
        self.resource_type = klass.get_resource_type() if klass.has_resource_base() else None
        self.primitive_extension = klass.get_resource_type() == "FHIRPrimitiveExtension"


_TABLES: dict[type[FHIRAbstractModel], Table] = {}  # a plain dict: looked up once per node, the hot path


def table(klass: type[FHIRAbstractModel]) -> Table:
    found = _TABLES.get(klass)
    if found is None:
        found = _TABLES[klass] = Table(klass)
    return found


def surely_valid(klass: type[FHIRAbstractModel], data: object) -> bool:
    """True only if `klass.model_validate(data)` certainly raises nothing; False: not sure."""
    if type(data) is not dict or not data:
        return False
    stack: list[tuple[type[FHIRAbstractModel], dict[str, Any]]] = [(klass, data)]
    pop, push = stack.pop, stack.append
    tables = _TABLES
    while stack:
        current, node = pop()
        t = tables.get(current) or table(current)
        fields = t.fields
        groups = 0  # bit set of the choice groups given
        for key, value in node.items():
            spec = fields.get(key)
            if spec is None:
                if key == "resourceType" and value == t.resource_type:
                    continue
                return False
            kind, many, how, group = spec
            if group >= 0:
                if groups & (1 << group):
                    return False  # two types of one choice element
                groups |= 1 << group
            if kind == PRIMITIVE:
                if many:
                    if type(value) is not list or not value:
                        return False
                    for item in value:
                        if not how(item):
                            return False
                elif not how(value):
                    return False
            elif kind == MODEL:
                if many:
                    if type(value) is not list or not value:
                        return False
                    for item in value:
                        if type(item) is not dict or not item:
                            return False
                        push((how, item))
                elif type(value) is not dict or not value:
                    return False
                else:
                    push((how, value))
            elif kind == RESOURCE:
                for item in (value if many and type(value) is list and value else () if many else (value,)):
                    inner = _resource_class(how, item)
                    if inner is None:
                        return False
                    push((inner, item))
                if many and (type(value) is not list or not value):
                    return False
            else:
                return False
        for key in t.required:
            if node.get(key) is None:
                return False
        for group in t.required_choices:
            if not groups & (1 << group):
                return False
        if t.primitive_extension and node.get("extension") is None and node.get("id") is None:
            return False
    return True


def _resource_class(how: type[FhirElementOrResourceBase], item: object) -> type[FHIRAbstractModel] | None:
    """The class fhir_core picks for a nested resource (by its resourceType), if it is a resource."""
    if type(item) is not dict or not item:
        return None
    rtype = item.get("resourceType")
    path = constraints.FHIR_TYPES_MAPS.get(f"{how._prefix}{rtype}Type") if type(rtype) is str else None
    if path is None:
        return None
    klass = _import(path)
    return klass if klass is not None and klass.has_resource_base() else None


@functools.cache
def _import(path: str) -> type[FHIRAbstractModel] | None:
    module, _, name = path.rpartition(".")
    try:
        klass = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - whatever the mapping names, stay total: "not sure"
        return None
    return klass if isinstance(klass, type) and issubclass(klass, FHIRAbstractModel) else None


# --- the element table, from the models' annotations --------------------------------------------


def _element(annotation: Any) -> tuple[int, bool, Any]:
    """(kind, is an array, checker or class) of a field's annotation (Optional, List and unions unwrapped)."""
    inner = _strip_none(annotation)
    many = typing.get_origin(inner) in (list, typing.List)  # noqa: UP006 - the models spell it typing.List
    if many:
        inner = _strip_none(typing.get_args(inner)[0])
    if isinstance(inner, type) and issubclass(inner, FhirBase):
        if issubclass(inner, FhirElementOrResourceBase):
            klass = inner.get_model_klass()
            return (RESOURCE, many, inner) if klass.__name__ == "Resource" else (UNSURE, many, None)
        return MODEL, many, inner.get_model_klass()
    check = _primitive(inner)
    return (PRIMITIVE, many, check) if check is not None else (UNSURE, many, None)


def _strip_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


_ID: Final = re.compile(constraints.TYPES_ID_PATTERN) if constraints.TYPES_ID_PATTERN else None
# A code: tokens separated by single spaces. Python's \s is wider than the models' (Rust) \s, so
# whatever this accepts, theirs does too.
_CODE: Final = re.compile(r"[^\s]+(\s[^\s]+)*")
_URI: Final = re.compile(r"\S+")


def _string(v: Any) -> bool:
    # The models' pattern "[ \r\n\t\S]+", searched: some character that is a space, a CR, LF or tab, or no
    # whitespace at all. An all-whitespace string of other kinds is left to them.
    return type(v) is str and v != "" and (not v.isspace() or any(c in " \r\n\t" for c in v))


def _code(v: Any) -> bool:
    return type(v) is str and _CODE.fullmatch(v) is not None


def _id(v: Any) -> bool:
    limit = constraints.TYPES_ID_MAX_LENGTH
    return (type(v) is str and 0 < len(v) and (limit is None or len(v) <= limit)
            and (_ID is None or _ID.fullmatch(v) is not None))


def _uri(v: Any) -> bool:
    return type(v) is str and _URI.fullmatch(v) is not None


def _markdown(v: Any) -> bool:
    return type(v) is str and v != ""


def _decimal(v: Any) -> bool:
    t = type(v)
    return t is int or (t is float and math.isfinite(v))


def _boolean(v: Any) -> bool:
    return type(v) is bool


def _text(v: Any) -> bool:
    return type(v) is str


def _integer(lo: int, hi: int) -> Check:
    return lambda v: type(v) is int and lo <= v <= hi


def _oid(pattern: re.Pattern[str]) -> Check:
    return lambda v: type(v) is str and pattern.fullmatch(v) is not None


_FRACTION: Final = re.compile(r"\.([0-9]+)")


def _temporal(kind: type[Date]) -> Check:
    """date, dateTime, instant: the type's own pattern, then a real calendar date (and time). What the
    models treat apart (a leap second, more than microseconds, a year before 1000) is left to them."""
    pattern, parse = kind.pattern, dt.date.fromisoformat if kind is Date else dt.datetime.fromisoformat

    def check(v: Any) -> bool:
        if type(v) is not str or pattern.fullmatch(v) is None or v[:1] == "0":
            return False
        if len(v) < 10:
            return True  # YYYY or YYYY-MM, kept as text by the models once the pattern holds
        if "T" in v:
            if ":60" in v:
                return False
            fraction = _FRACTION.search(v)
            if fraction is not None and len(fraction[1]) > 6:
                return False
        try:
            parse(v)
        except ValueError:
            return False
        return True
    return check


def _adapter(annotation: Any) -> Check:
    """Any other primitive (date, dateTime, instant, time, url, uuid, base64Binary, xhtml): its own validator."""
    adapter = TypeAdapter(annotation)

    def check(v: Any) -> bool:
        if type(v) is not str or v == "":
            return False
        try:
            adapter.validate_python(v)
        except (ValidationError, ValueError, TypeError):
            return False
        return True
    return check


def _primitive(inner: Any) -> Check | None:
    if inner is bool:
        return _boolean
    if inner is str:
        return _text
    if typing.get_origin(inner) is not typing.Annotated:
        return None
    base, *meta = typing.get_args(inner)
    kinds = [m for m in meta if not isinstance(m, type)]
    first = kinds[0] if kinds else None
    if isinstance(first, Integer) and base is int:  # Integer, UnsignedInt, PositiveInt
        return _integer(first.min_length, first.max_length)
    if isinstance(first, Oid):
        return _oid(first.pattern)
    if isinstance(first, Code):
        return _code
    if isinstance(first, Id):
        return _id
    if isinstance(first, String):
        return _string
    if isinstance(first, Markdown):
        return _markdown
    if isinstance(first, Uri | Canonical):
        return _uri
    if Decimal in meta or isinstance(first, Decimal):
        return _decimal
    if isinstance(first, Date) and type(first) in (Date, DateTime, Instant):
        return _temporal(type(first))
    try:
        return _adapter(inner)
    except Exception:  # noqa: BLE001 - a type pydantic cannot adapt alone: "not sure" for every value
        return None
