"""Validating inputs and outputs at the boundary: pydantic models or JSON-able values."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from sdk.errors import InputValidationError, OutputSerializationError, PayloadLimitError
from sdk.limits import CEILING_LIMITS, PayloadLimits, checked_json


def to_json_value(value: Any, what: str, limits: PayloadLimits = CEILING_LIMITS, *, is_input: bool = False) -> Any:
    """Turn ``value`` into plain JSON data, or raise naming ``what`` and the offending type.

    Raises ``PayloadLimitError`` if the data is over ``limits`` (checked here, where it comes
    in, rather than when a message that holds it is refused later).
    """
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    try:
        return checked_json(value, limits, what, default=_pydantic_default)[1]
    except TypeError as e:
        if is_input:  # an input is the caller's mistake, not the task's
            raise InputValidationError(
                f"{what} is not JSON-serialisable: {e} (value: {_short_repr(value)}). "
                "Pass a pydantic model or JSON-able data (dict, list, str, int, float, bool, None).") from None
        raise OutputSerializationError(
            f"{what} is not JSON-serialisable: {e} (value: {_short_repr(value)}). "
            "Return a pydantic model or JSON-able data (dict, list, str, int, float, bool, None)."
        ) from None


def _pydantic_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _short_repr(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 120 else r[:117] + "..."


class Signature:
    """What a task function takes and returns, read from its annotations."""

    def __init__(self, fn: Callable[..., Any], task_name: str, limits: PayloadLimits = CEILING_LIMITS) -> None:
        self.task_name = task_name
        self.limits = limits
        try:
            hints = typing.get_type_hints(fn)
        except Exception:
            hints = {}
        params = list(inspect.signature(fn).parameters.values())
        if len(params) < 2:
            raise TypeError(
                f"task {task_name!r}: the function must take (input, ctx); it takes {len(params)} parameter(s)"
            )
        self.input_type: Any = hints.get(params[0].name, Any)
        self.output_type: Any = hints.get("return", Any)
        self._input_adapter: TypeAdapter[Any] | None = (
            TypeAdapter(self.input_type) if self.input_type is not Any else None
        )
        self._output_adapter: TypeAdapter[Any] | None = (
            TypeAdapter(self.output_type) if self.output_type not in (Any, None, type(None)) else None
        )

    @property
    def input_model(self) -> type[BaseModel] | None:
        t = self.input_type
        return t if isinstance(t, type) and issubclass(t, BaseModel) else None

    def dump_input(self, value: Any) -> Any:
        """Validate a caller's input and return its JSON form (raises InputValidationError)."""
        model = self.input_model
        if model is not None:
            if value is None:
                value = {}
            if isinstance(value, BaseModel) and not isinstance(value, model):
                value = value.model_dump(mode="json")
            try:
                inst = value if isinstance(value, model) else model.model_validate(value)
            except ValidationError as e:
                raise InputValidationError(
                    f"input for task {self.task_name!r} does not fit {model.__name__}: {_short_repr(value)}\n{e}"
                ) from None
            value = inst.model_dump(mode="json")
        return to_json_value(value, f"input for task {self.task_name!r}", self.limits, is_input=True)

    def load_input(self, data: Any) -> Any:
        if self._input_adapter is None:
            return data
        try:
            return self._input_adapter.validate_python(data if data is not None else {})
        except ValidationError as e:
            raise InputValidationError(f"input for task {self.task_name!r} is invalid: {e}") from None

    def dump_output(self, value: Any) -> Any:
        """The result as JSON data; a result over the limits cannot be stored, so it fails the run."""
        try:
            return to_json_value(value, f"the result of task {self.task_name!r}", self.limits)
        except PayloadLimitError as e:
            raise OutputSerializationError(str(e)) from e

    def load_output(self, data: Any) -> Any:
        if self._output_adapter is None:
            return data
        t = self.output_type
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t.model_validate(data)
        return data


def return_adapter(fn: Callable[..., Any]) -> TypeAdapter[Any] | None:
    """For memo: rebuild the recorded value into the function's annotated return type."""
    try:
        hint = typing.get_type_hints(fn).get("return")
    except Exception:
        return None
    if hint is None or hint is Any:
        return None
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return TypeAdapter(hint)
    return None
