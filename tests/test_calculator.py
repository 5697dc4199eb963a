"""The calculator tool: arithmetic right, everything else refused before it runs."""

import pytest

from ghostvis.infer.calculator import MAX_EXPRESSION_CHARS, CalculatorError, calculate


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("12 / 2", "6"),
        ("7 / 2", "3.5"),
        ("7 // 2", "3"),
        ("-7 // 2", "-4"),
        ("7 % 3", "1"),
        ("-3 ** 2", "-9"),
        ("2 ** 10", "1024"),
        ("2 ** -1", "0.5"),
        ("1 / 3", "0.3333333333"),
        ("+4 - -4", "8"),
        ("1.5 * 4", "6"),
        (" 40 + 2 \n", "42"),
        ("123456789 * 987654321", "121932631112635269"),
    ],
)
def test_arithmetic(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    "expression, reason",
    [
        ("__import__('os').system('true')", "Call"),
        ("open('/etc/passwd')", "Call"),
        ("x + 1", "Name"),
        ("True + 1", "Constant"),
        ("'a' * 3", "Constant"),
        ("(1).real", "Attribute"),
        ("[1, 2]", "List"),
        ("1 if 1 else 2", "IfExp"),
        ("lambda: 1", "Lambda"),
        ("1 < 2", "Compare"),
        ("1 & 3", "BinOp"),
        ("9 ** 9 ** 9", "exponent"),
        ("(2 ** 1000) ** 1000", "larger than"),
        ("10.0 ** 400", "too large"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("", "empty"),
        ("1 +", "not a valid expression"),
        ("1" + "+1" * MAX_EXPRESSION_CHARS, "longer than"),
    ],
)
def test_refuses_anything_but_arithmetic(expression, reason):
    with pytest.raises(CalculatorError, match=reason):
        calculate(expression)


def test_never_runs_refused_code(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(CalculatorError):
        calculate(f"open({str(marker)!r}, 'w')")
    assert not marker.exists()
