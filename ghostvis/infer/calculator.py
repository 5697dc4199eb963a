"""A safe arithmetic evaluator for the model's calculator tool.

The model writes an expression between <|python_start|> and <|python_end|>; we parse it with `ast`
and walk the tree ourselves, accepting only numbers and arithmetic. Nothing is ever passed to
`eval`/`exec`, so a name, call, attribute or string is refused before anything runs.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 1000  # 2**1000 is fine; 9**9**9 would hang the server
MAX_INT_BITS = 4096  # bound every intermediate integer, so chained powers can't eat memory either

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or is too big to evaluate."""


def _check_size(value: object) -> int | float:
    if isinstance(value, complex):  # (-8) ** 0.5 is complex in Python
        raise CalculatorError("result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"result is larger than 2**{MAX_INT_BITS}")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    return value


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    # bool is a subclass of int: refuse True/False explicitly, they are names in the user's text
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            return _check_size(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError as e:
            raise CalculatorError("division by zero") from e
        except OverflowError as e:
            raise CalculatorError("result is too large") from e
    raise CalculatorError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")


def _format(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))  # "6" rather than "6.0" for 12/2: what a reader expects
    if isinstance(value, float):
        return repr(round(value, 10))
    return str(value)


def calculate(expression: str) -> str:
    """Evaluate `expression` (arithmetic only) and return the result as text.

    Raises CalculatorError for anything that is not arithmetic, too long, or too large.
    """
    text = expression.strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"not a valid expression: {e.msg}") from e
    return _format(_eval(tree))
