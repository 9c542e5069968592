"""Mistakes in a definition fail where they are written, naming the bad value and what was expected."""

from __future__ import annotations

import pytest

from sdk import Bide, Context, EmptyModel, InvalidExpression, ParentCondition, UserEventCondition
from sdk.durations import parse_duration
from sdk.errors import WorkflowDefinitionError
from sdk.runs import RunList


@pytest.mark.parametrize(("expression", "why"), [
    ("inputs.user_id == '1'", "unknown name 'inputs': an expression here may use 'input', 'async' or 'event'"),
    ("foo.bar == 1", "unknown name 'foo'"),
    ("input.x == y", "unknown name 'y'"),
    ("input.x + 1", "its value is a number (arithmetic), never true or false"),
    ("-input.x", "its value is a number (arithmetic)"),
    ('"abc"', "its value is a string"),
    ("[input.x]", "its value is a list"),
    ("input.a == 9223372036854775808", "the integer 9223372036854775808 is outside CEL's int range"),
    ("input.u == 18446744073709551616u", "outside CEL's uint range"),
])
def test_a_wait_expression_that_could_never_match_is_refused(expression: str, why: str) -> None:
    """Each of these evaluates to an error or a non-boolean on every event: the wait would never match."""
    with pytest.raises(InvalidExpression) as err:
        UserEventCondition("k", expression)
    assert why in str(err.value) and repr(expression) in str(err.value)


@pytest.mark.parametrize("expression", [
    "input.x == 1",
    "async.data.userId == event.data.userId",
    "input.items.exists(i, i > 0) && has(input.y)",
    "input.m.all(k, input.m[k] > 0)",
    "[1, 2].map(v, v * 2)[0] == 2",
    "type(input.b) == string",
    "input.flag",
    "!input.flag",
    "input.x > 0 ? input.ok : false",
    "input.a == 9223372036854775807 || input.a == -9223372036854775808",
    "input.ts > timestamp('2020-01-01T00:00:00Z')",
    "size(input.s) > 1 && input.s.startsWith('a') && int(input.n) == 3",
])
def test_valid_wait_expressions_are_accepted(expression: str) -> None:
    assert UserEventCondition("k", expression).expression == expression


def test_a_parent_condition_sees_output_only() -> None:
    assert ParentCondition(parent=None, expression="output.ok == true").expression == "output.ok == true"
    with pytest.raises(InvalidExpression, match="unknown name 'input': an expression here may use 'output'"):
        ParentCondition(parent=None, expression="input.ok == true")


@pytest.mark.parametrize("text", ["1.2.3s", ".s", "²s", "1h 30m", "5", "s", ""])
def test_a_malformed_duration_names_the_argument_and_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_duration(text, "timeout")
    assert str(err.value) == f"timeout {text!r} is not a duration like '500ms', '5s', '2m', '1h' or '3d'"


@pytest.mark.parametrize(("text", "seconds"), [("1h30m", 5400), (".5s", 0.5), ("1.5s", 1.5), ("10ms5s", 5.01),
                                               ("3d", 259200)])
def test_durations_as_written(text: str, seconds: float) -> None:
    assert parse_duration(text, "timeout").total_seconds() == pytest.approx(seconds)


def test_a_decorated_workflow_task_is_named_in_its_definition_error() -> None:
    wf = Bide().workflow(name="W")

    @wf.task()
    def first(input: EmptyModel, ctx: Context) -> dict[str, int]:
        return {}

    with pytest.raises(WorkflowDefinitionError, match="workflow 'W', task 'other': unknown parent 'first'"):
        @wf.task(parents=["first"])
        def other(input: EmptyModel, ctx: Context) -> dict[str, int]:
            return {}


def test_a_page_of_runs_iterates_over_its_runs() -> None:
    runs = [object(), object()]
    page = RunList(runs=runs, cursor=None)  # type: ignore[arg-type]
    assert list(page) == runs and len(page) == 2
