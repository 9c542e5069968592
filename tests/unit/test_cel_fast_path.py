"""The fast path for ``input.a == <literal>`` reads what the CEL parser reads, and accepts only what it accepts."""

import pytest

from sdk import _cel
from sdk.errors import InvalidExpression

EXPRESSIONS = [
    "input.id == 17", 'input.a.b=="x y"', " async.ok == true ", "input.flag == false", "input.id == 0",
    "input.id == 9223372036854775807", "input.id == 9223372036854775808", "input.in == 1", "input.id == 017",
    '"x" == input.a', "input.id == 1 && input.b == 2", 'input.s == "a\\"b"', "input.id == -5", "input.x == 1.5",
    "input.x == null", "input._a1 == 0", "input.id == 5 || true", "input.id > 5", "event.id == 5", "input == 5",
    'input.s == ""', "input.id == 12345678901234567890123", None, "",
]


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_fast_path_agrees_with_the_parser(expression: str | None) -> None:
    assert _cel.equality_predicates(expression) == _cel.parsed_equality_predicates(expression)
    if expression is not None:
        try:
            _cel._compiled(expression)
            parses = True
        except InvalidExpression:
            parses = False
        if _cel._simple_equality(expression) is not None:
            assert parses  # what check_expression accepts unparsed, the parser accepts


def test_invalid_cel_still_raises() -> None:
    with pytest.raises(Exception):  # noqa: B017  (cel-python's parse error)
        _cel.equality_predicates("input.n ==")
    with pytest.raises(InvalidExpression):
        _cel.check_expression("input.n ==")
