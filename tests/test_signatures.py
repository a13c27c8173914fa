"""No function takes more than 10 parameters (the team's rule), click commands aside: their parameters are the
flags. Settings that travel together travel as one object (a plan, a sub-plan, a spec, a small frozen dataclass)."""

from __future__ import annotations

import ast
from pathlib import Path

from test_layers import ROOT, sources

MAX_PARAMETERS = 10


def is_click_command(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """True for a click command or a function decorated with click options (its parameters are the flags)."""
    for decorator in function.decorator_list:
        text = ast.unparse(decorator)
        if "command" in text or "click.option" in text or "click.argument" in text or text.endswith("_options"):
            return True
    return False


def parameter_count(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Named parameters (positional-only, positional, keyword-only), without a method's self or cls; *args and
    **kwargs do not count (what they take is checked where they are read)."""
    args = function.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return len(names) - (1 if names and names[0] in ("self", "cls") else 0)


def long_signatures(path: Path) -> dict[tuple[str, str], int]:
    """(file, function) -> parameters of each function in ``path`` above the limit, click commands aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    file = path.relative_to(ROOT).as_posix()
    return {(file, node.name): parameter_count(node) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and parameter_count(node) > MAX_PARAMETERS and not is_click_command(node)}


def test_no_function_takes_more_than_ten_parameters():
    found: dict[tuple[str, str], int] = {}
    for path in sources():
        found.update(long_signatures(path))
    assert not found, f"functions with more than {MAX_PARAMETERS} parameters (group them into a plan or spec): {found}"


def test_the_count_sees_what_it_must():
    counted = ast.parse("def f(a, b, /, c, *args, d, e=1, **kw): pass\n"
                        "class C:\n    def m(self, a): pass\n").body
    assert parameter_count(counted[0]) == 5 and parameter_count(counted[1].body[0]) == 1
    command = ast.parse("@click.command('x')\n@click.option('--a')\ndef c(a, b, c, d, e, f, g, h, i, j, k): pass\n")
    assert is_click_command(command.body[0])
    plain = ast.parse("@functools.lru_cache\ndef p(a, b, c, d, e, f, g, h, i, j, k): pass\n").body[0]
    assert parameter_count(plain) == 11 and not is_click_command(plain)  # counted, and over the limit
