"""CEL expressions of waits: checked when a wait is made, compiled once, read for an index.

In an expression ``input`` (also ``async``, Inngest's name) is the awaited event's
payload and ``event`` is the waiting run's own input. The router indexes waits by the
equality predicates it can read out of an expression (``input.user_id == '1234'``), so
an event costs one evaluation per *candidate*, not per wait.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any

import celpy
import celpy.celparser
from celpy.adapter import json_to_cel
from lark import Token, Tree

from sdk.errors import InvalidExpression

log = logging.getLogger("bide.cel")

_env = celpy.Environment()

Path = tuple[str, ...]
IndexValue = tuple[str, Any]
"""A payload value as the index sees it, tagged by CEL type (``"1" != 1`` and, in cel-python, ``1 != 1.0``)."""


def is_trivial(expression: str | None) -> bool:
    """An expression that accepts every payload."""
    return expression is None or expression.strip() in ("", "true")


WAIT_NAMES = ("input", "async", "event")
"""What a wait's expression may name: the awaited event's payload (twice) and the run's own input."""
OUTPUT_NAMES = ("output",)
"""What a ``ParentCondition``'s expression may name: the parent's output."""

# Type names CEL lets an expression use as values (``type(input.x) == string``).
_TYPE_NAMES = frozenset(("bool", "bytes", "double", "int", "list", "map", "null_type", "string", "type", "uint",
                         "google"))
# Macros whose first argument names a variable of their own (``input.items.exists(i, i > 0)``).
_BINDING_MACROS = frozenset(("all", "exists", "exists_one", "filter", "map"))
_UINT64_MAX = 2**64 - 1


def check_expression(expression: str, names: tuple[str, ...] = WAIT_NAMES) -> str:
    """Check ``expression`` now, so a bad one fails where it was written, not by never matching.

    Refused: what does not parse (with the parser's reason), a name other than ``names`` (and
    CEL's own type names and a macro's variables: ``inputs.user_id`` evaluates to an error on
    every event, so the wait would never match), an integer literal outside CEL's range, and an
    expression whose value can only be a number, string, list or map, never true or false.
    """
    if not isinstance(expression, str):
        raise InvalidExpression(repr(expression), f"an expression must be a string, got {type(expression).__name__}")
    if is_trivial(expression):
        return expression
    if _simple_equality(expression) is not None:
        if names == WAIT_NAMES:
            return expression  # the commonest shape is valid as read (tests/unit/test_cel_fast_path.py)
    _checked(expression, names)
    return expression


@functools.lru_cache(maxsize=256)
def _checked(expression: str, names: tuple[str, ...]) -> None:
    _compiled(expression)
    tree = _tree(expression)
    bound: set[str] = set()
    for node in tree.iter_subtrees():
        if node.data == "member_dot_arg" and len(node.children) == 3 and str(node.children[1]) in _BINDING_MACROS:
            args = node.children[2]
            first = _unwrap(args.children[0]) if isinstance(args, Tree) and args.children else None
            if isinstance(first, Tree) and first.data == "primary" and isinstance(first.children[0], Tree):
                bound.update(str(t) for t in first.children[0].children if isinstance(t, Token))
    allowed = set(names) | _TYPE_NAMES | bound
    # In the order written, so the first bad name is the one named.
    for node in sorted(tree.iter_subtrees(), key=_position):
        if node.data in ("ident", "dot_ident") and node.children:
            name = str(node.children[0])
            if name not in allowed:
                raise InvalidExpression(expression, f"unknown name {name!r}: an expression here may use "
                                        + _one_of(names))
        elif node.data == "literal" and node.children and isinstance(node.children[0], Token):
            token = node.children[0]
            if token.type in ("INT_LIT", "UINT_LIT"):
                text = str(token).rstrip("uU")
                value = int(text, 0)
                top = _UINT64_MAX if token.type == "UINT_LIT" else _INT64_MAX
                if not -_INT64_MAX - 1 <= value <= top:
                    raise InvalidExpression(expression, f"the integer {token} is outside CEL's "
                                            f"{'uint' if token.type == 'UINT_LIT' else 'int'} range")
    top_node = _unwrap(tree)
    kind = _value_kind(top_node)
    if kind is not None:
        raise InvalidExpression(expression, f"its value is {kind}, never true or false: "
                                "a condition compares (==, <, in, ...) or tests (has(), exists(), ...)")


def _position(node: Tree[Any]) -> int:
    token = node.children[0] if node.children else None
    return token.start_pos or 0 if isinstance(token, Token) else 0


def _one_of(names: tuple[str, ...]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _value_kind(node: Any) -> str | None:
    """What the expression's top node makes if that can only be a non-boolean value, else ``None``."""
    if not isinstance(node, Tree):
        return None
    if node.data.startswith(("addition_", "multiplication_")) or node.data in ("addition", "multiplication"):
        return "a number (arithmetic)"
    if node.data == "unary" and node.children and isinstance(node.children[0], Tree) \
            and node.children[0].data == "unary_neg":
        return "a number (arithmetic)"
    if node.data == "primary" and node.children:
        inner = node.children[0]
        if isinstance(inner, Tree) and inner.data == "list_lit":
            return "a list"
        if isinstance(inner, Tree) and inner.data == "map_lit":
            return "a map"
        if isinstance(inner, Tree) and inner.data == "literal":
            return _literal_kind(inner)
    if node.data == "literal":
        return _literal_kind(node)
    return None


def _literal_kind(node: Tree[Any]) -> str | None:
    token = node.children[0] if node.children else None
    if not isinstance(token, Token) or token.type == "BOOL_LIT":
        return None
    return {"INT_LIT": "a number", "UINT_LIT": "a number", "FLOAT_LIT": "a number", "STRING_LIT": "a string",
            "BYTES_LIT": "bytes", "NULL_LIT": "null", "MLSTRING_LIT": "a string"}.get(token.type)


@functools.lru_cache(maxsize=256)
def _compiled(expression: str) -> Any:
    try:
        ast = _tree(expression)
    except celpy.celparser.CELParseError as e:
        col = getattr(e, "column", None)
        where = f" at column {col}" if col else ""
        raise InvalidExpression(expression, f"syntax error{where}:\n{str(e).rstrip()}") from None
    return _env.program(ast)


@functools.lru_cache(maxsize=256)
def _tree(expression: str) -> Tree[Any]:
    return _env.compile(expression)


def evaluate(expression: str | None, payload: Any, run_input: Any = None) -> bool:
    """Whether ``payload`` satisfies ``expression``. An evaluation error (a missing field) is "no"."""
    if is_trivial(expression):
        return True
    assert expression is not None
    program = _compiled(expression)
    awaited = json_to_cel(payload)
    activation = {"input": awaited, "async": awaited, "event": json_to_cel(run_input)}
    try:
        result = program.evaluate(activation)
    except Exception as e:  # cel-python raises several types for missing fields and bad types
        log.debug("expression %r raised %s on %r", expression, e, payload)
        return False
    return result is True or (isinstance(result, celpy.celtypes.BoolType) and bool(result))


def evaluate_output(expression: str, output: Any) -> bool:
    """A ``ParentCondition``: ``expression`` over ``output`` (the parent's output). An error is "no"."""
    if is_trivial(expression):
        return True
    program = _compiled(expression)
    try:
        result = program.evaluate({"output": json_to_cel(output)})
    except Exception as e:
        log.debug("expression %r raised %s on %r", expression, e, output)
        return False
    return result is True or (isinstance(result, celpy.celtypes.BoolType) and bool(result))


def reads_run_input(expression: str | None) -> bool:
    """Whether the expression uses ``event`` (the run's own input)."""
    if is_trivial(expression):
        return False
    assert expression is not None
    tokens = _tree(expression).scan_values(lambda _: True)
    return any(isinstance(t, Token) and t.type == "IDENT" and t == "event" for t in tokens)


def index_value(value: Any) -> IndexValue | None:
    """The tagged form of a payload value, or ``None`` if it cannot be an equality key."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        return ("i", value)
    if isinstance(value, float):
        return ("d", value)
    if isinstance(value, str):
        return ("s", value)
    if value is None:
        return ("z", None)
    return None


def lookup(payload: Any, path: Path) -> Any:
    """``payload`` at ``path``; raises ``KeyError`` if absent."""
    for part in path:
        if not isinstance(payload, dict):
            raise KeyError(part)
        payload = payload[part]
    return payload


def cel_literal(value: Any) -> str | None:
    """``value`` written as a CEL literal, or ``None`` if it is not a scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    return None


_INT64_MAX = 2**63 - 1
_CEL_RESERVED = frozenset((
    "false", "in", "null", "true", "as", "break", "const", "continue", "else", "for", "function", "if", "import",
    "let", "loop", "package", "namespace", "return", "var", "void", "while",
))
_PATH = r"(?:input|async)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)"
_LITERAL = r'(0|[1-9][0-9]{0,18}|true|false|"[^"\\\n]*")'
_SIMPLE_EQ = re.compile(rf"\s*{_PATH}\s*==\s*{_LITERAL}\s*")


def _simple_equality(expression: str) -> tuple[Path, IndexValue] | None:
    """The commonest shape, ``input.a.b == <literal>``, read without the parser (``None`` for anything else).

    Every wait's expression differs (``input.id == 17``), so the parser's cache does not
    help: parsing is ~0.8 ms an expression, paid by the host that makes the wait (twice:
    when it parks and when it resumes) and by the router that indexes it (100,000 waits:
    80 s of rebuild). One predicate on a plain path against a non-negative integer, a
    boolean or a string without escapes is read here with the parser's result.
    """
    m = _SIMPLE_EQ.fullmatch(expression)
    if m is None:
        return None
    path = tuple(m.group(1)[1:].split("."))
    lit = m.group(2)
    value: IndexValue | None
    if lit[0] == '"':
        value = ("s", lit[1:-1])
    elif lit in ("true", "false"):
        value = ("b", lit == "true")
    else:
        value = ("i", int(lit)) if int(lit) <= _INT64_MAX else None
    if value is None or _CEL_RESERVED.intersection(path):
        return None
    return path, value


def equality_predicates(expression: str | None) -> tuple[tuple[tuple[Path, IndexValue], ...], bool]:
    """:func:`parsed_equality_predicates`, reading the commonest shape without the parser."""
    if expression is not None and (simple := _simple_equality(expression)) is not None:
        return (simple,), True
    return parsed_equality_predicates(expression)


@functools.lru_cache(maxsize=4096)
def parsed_equality_predicates(expression: str | None) -> tuple[tuple[tuple[Path, IndexValue], ...], bool]:
    """The ``input.<path> == <literal>`` conjuncts of an expression, and whether they are all of it.

    Every wait the expression accepts satisfies each predicate, so an index on any one
    of them never hides a match. When the predicates are the whole expression the
    index lookup *is* the evaluation.
    """
    if is_trivial(expression):
        return (), True
    assert expression is not None
    preds: list[tuple[Path, IndexValue]] = []
    complete = True
    for conjunct in _conjuncts(_tree(expression)):
        pred = _equality(conjunct)
        if pred is None:
            complete = False
        else:
            preds.append(pred)
    return tuple(preds), complete


def _unwrap(node: Any) -> Any:
    while isinstance(node, Tree) and len(node.children) == 1 and node.data in (
        "expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication", "unary", "member",
    ):
        node = node.children[0]
    return node


def _conjuncts(node: Any) -> list[Any]:
    node = _unwrap(node)
    if isinstance(node, Tree) and node.data == "conditionaland":
        out: list[Any] = []
        for child in node.children:
            out.extend(_conjuncts(child))
        return out
    return [node]


def _equality(node: Any) -> tuple[Path, IndexValue] | None:
    if not (isinstance(node, Tree) and node.data == "relation" and len(node.children) == 2):
        return None
    left, right = node.children
    if not (isinstance(left, Tree) and left.data == "relation_eq" and len(left.children) == 1):
        return None
    a, b = _operand(left.children[0]), _operand(right)
    if a is None or b is None:
        return None
    if a[0] == "path" and b[0] == "lit":
        return a[1], b[1]
    if b[0] == "path" and a[0] == "lit":
        return b[1], a[1]
    return None


def _operand(node: Any) -> tuple[str, Any] | None:
    node = _unwrap(node)
    if not isinstance(node, Tree):
        return None
    if node.data == "primary" or node.data == "literal":
        return _literal(node)
    parts: list[str] = []
    while isinstance(node, Tree) and node.data == "member_dot" and len(node.children) == 2:
        field = node.children[1]
        if not isinstance(field, Token):
            return None
        parts.append(str(field))
        node = _unwrap(node.children[0])
    if isinstance(node, Tree) and node.data == "primary" and len(node.children) == 1:
        ident = node.children[0]
        if isinstance(ident, Tree) and ident.data == "ident" and ident.children:
            ident = ident.children[0]
        if isinstance(ident, Token) and str(ident) in ("input", "async") and parts:
            return "path", tuple(reversed(parts))
    return None


def _literal(node: Tree[Any]) -> tuple[str, Any] | None:
    text = node
    while isinstance(text, Tree) and len(text.children) == 1:
        text = text.children[0]
    if not isinstance(text, Token):
        return None
    return _literal_value(str(text))


@functools.lru_cache(maxsize=4096)
def _literal_value(text: str) -> tuple[str, Any] | None:
    try:
        value = _env.program(_env.compile(text)).evaluate({})
    except Exception:
        return None
    if isinstance(value, celpy.celtypes.BoolType):
        tagged = index_value(bool(value))
    elif isinstance(value, celpy.celtypes.StringType):
        tagged = index_value(str(value))
    elif isinstance(value, celpy.celtypes.IntType | celpy.celtypes.UintType):
        tagged = index_value(int(value))
    elif isinstance(value, celpy.celtypes.DoubleType):
        tagged = index_value(float(value))
    else:
        return None
    return ("lit", tagged) if tagged is not None else None
