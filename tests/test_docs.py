"""The docs say what the code does: development.md's layout names exactly the modules that exist,
every page is reachable from the README or docs/index.md, every relative link lands on a file, and
every module path a docstring or page names (``robust.x.y``, :mod:/:func:/:class: references) exists,
and the option lists the docs give are the choices the commands take."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import click

from robust.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("robust", "attacks", "cli")
DOCS = ROOT / "docs"

# "├── name.py   description", nested under "│   " or "    " per level; a top-level entry has no connector.
TREE_LINE = re.compile(r"^(?P<indent>(?:[│ ]   )*)(?P<connector>[├└]── )?(?P<name>\S+)")
LINK = re.compile(r"!?\[[^\]\n]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCED = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# robust.x.y anywhere in a docstring; attacks.x / cli.x (installed as robust.attacks / robust.cli)
# only inside a Sphinx role or double backticks, where they are meant as module paths.
ROBUST_PATH = re.compile(r"(?<![\w./-])(robust(?:\.[A-Za-z_]\w*)+)")
TOP_PATH = re.compile(r"(?::\w+:`~?|``)((?:attacks|cli)(?:\.[A-Za-z_]\w*)+)")
PLACEHOLDERS = {"robust.bench.NAME"}  # `python -m robust.bench.NAME`: NAME stands for a module


def layout_block() -> list[str]:
    """The fenced tree under development.md's "## Package layout" heading, line by line."""
    section = (DOCS / "development.md").read_text().split("## Package layout\n", 1)[1]
    return section.split("```\n", 2)[1].splitlines()


def layout_paths() -> set[str]:
    """Every path the layout names, as "robust/nn/norms.py" or "robust/nn/" (folders end in /)."""
    named, parents = set(), []
    for line in layout_block():
        match = TREE_LINE.match(line)
        if not match:
            continue
        depth = len(match["indent"]) // 4 + (1 if match["connector"] else 0)
        parents = parents[:depth]
        path = "".join(parents) + match["name"]
        named.add(path)
        if path.endswith("/"):
            parents.append(match["name"])
    return named


def modules_that_exist() -> set[str]:
    """Every module and subpackage of robust/, attacks/ and cli/ a layout must name."""
    found = {f"{package}/" for package in PACKAGES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if "__pycache__" in relative:
                continue
            if path.name == "__init__.py":
                if path.parent != ROOT / package:
                    found.add(path.parent.relative_to(ROOT).as_posix() + "/")
            else:
                found.add(relative)
    return found


def test_the_layout_parser_reads_nesting():
    paths = layout_paths()
    assert {"robust/", "robust/nn/", "robust/nn/norms.py", "robust/bench/commands.py", "attacks/pgd.py",
            "cli/train.py", "tests/"} <= paths
    assert "robust/norms.py" not in paths and "robust/nn/checkpoint.py" not in paths


def test_the_layout_names_every_module_and_only_modules_that_exist():
    named, present = layout_paths(), modules_that_exist()
    missing = sorted(present - named)
    absent = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing and not absent, (
        "docs/development.md's package layout is out of date:"
        + (f"\n  modules not in the layout (add a line each): {', '.join(missing)}" if missing else "")
        + (f"\n  paths in the layout that do not exist (remove them): {', '.join(absent)}" if absent else ""))


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def relative_links(page: Path) -> list[tuple[str, Path]]:
    """The link text and target file of each relative link in a page (anchors dropped), code excluded."""
    text = INLINE_CODE.sub("", FENCED.sub("", page.read_text()))
    links = []
    for match in LINK.finditer(text):
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, https:, mailto: and anchors within the page
        links.append((target, (page.parent / target.split("#", 1)[0]).resolve()))
    return links


def test_every_relative_link_points_to_a_file_that_exists():
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in markdown_files()
              for target, path in relative_links(page) if not path.exists()]
    assert broken == [], "links to files that do not exist:\n  " + "\n  ".join(broken)


def test_every_docs_page_is_linked_from_the_readme_or_the_index():
    linked = {path for page in (ROOT / "README.md", DOCS / "index.md") for _, path in relative_links(page)}
    unlinked = [page.relative_to(ROOT).as_posix() for page in sorted(DOCS.glob("*.md"))
                if page.resolve() not in linked and page.name != "index.md"]
    assert unlinked == [], "docs pages linked from neither README.md nor docs/index.md: " + ", ".join(unlinked)
    assert (DOCS / "index.md").resolve() in {p for _, p in relative_links(ROOT / "README.md")}


def test_the_readme_shows_robust_report():
    readme = (ROOT / "README.md").read_text()
    assert "robust report" in readme
    assert (DOCS / "report.md").resolve() in {p for _, p in relative_links(ROOT / "README.md")}


def docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the module's, each class's and each function's docstring."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=False)
            if text:
                found.append((node.body[0].lineno, text))
    return found


def resolves(dotted: str) -> bool:
    """True if the longest module prefix of ``dotted`` exists and the rest are attributes of it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # a parent that is a module, not a package
            spec = None
        if spec is None:
            continue
        target = importlib.import_module(name)
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def named_paths(text: str) -> set[str]:
    paths = set(ROBUST_PATH.findall(text))
    paths |= {f"robust.{path}" for path in TOP_PATH.findall(text)}
    return paths - PLACEHOLDERS


def test_the_reference_resolver():
    assert resolves("robust.nn.norms") and resolves("robust.train.trainer.Trainer")
    assert resolves("robust.attacks.pgd") and resolves("robust.errors")
    assert not resolves("robust.nn.Trainer") and not resolves("robust.lab.report")
    assert named_paths("see :mod:`attacks.pgd` and :func:`robust.eval.evaluate`.") == {
        "robust.attacks.pgd", "robust.eval.evaluate"}


def test_docstrings_name_modules_and_attributes_that_exist():
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, text in docstrings(path):
                wrong += [f"{path.relative_to(ROOT)}:{line}: {name}"
                          for name in sorted(named_paths(text)) if not resolves(name)]
    assert wrong == [], "docstrings name paths that do not exist:\n  " + "\n  ".join(wrong)


# "--norm bn|auxbn|sabn": a flag and its values as the docs list them.
CHOICE_LIST = re.compile(r"--(?P<flag>[a-z][a-z-]*) (?P<values>[a-z0-9_:-]+(?:\|[a-z0-9_:-]+)+)")


def click_choices() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Every command's choice flags (flag -> the values any command accepts) and `robust train`'s own.
    A flag that some command takes as free text (--arch of train) is left out of the first."""
    choices: dict[str, set[str]] = {}
    free: set[str] = set()
    ctx = click.Context(cli)
    commands = {name: cli.get_command(ctx, name) for name in cli.list_commands(ctx)}  # the group loads them lazily
    for command in commands.values():
        for param in command.params:
            for flag in (o for o in param.opts if o.startswith("--")):
                if isinstance(param.type, click.Choice):
                    choices.setdefault(flag[2:], set()).update(param.type.choices)
                else:
                    free.add(flag[2:])
    train = {flag[2:]: set(p.type.choices) for p in commands["train"].params
             if isinstance(p.type, click.Choice) for flag in p.opts if flag.startswith("--")}
    return {k: v for k, v in choices.items() if k not in free}, train


def test_option_lists_in_the_docs_name_the_choices_the_commands_take():
    choices, train = click_choices()
    wrong = []
    for page in markdown_files():
        for match in CHOICE_LIST.finditer(page.read_text()):
            flag, values = match["flag"], set(match["values"].split("|"))
            if flag in choices and not values <= choices[flag]:
                wrong.append(f"{page.relative_to(ROOT)}: --{flag} lists {sorted(values - choices[flag])}, "
                             f"which no command takes")
            if page.name == "README.md" and flag in train and values != train[flag]:
                wrong.append(f"README.md: --{flag} lists {match['values']}, "
                             f"robust train takes {'|'.join(sorted(train[flag]))}")
    assert wrong == [], "\n".join(wrong)


def test_the_developer_guide_lists_every_attack_bn_mode():
    """The "- `attack_bn`: `train`, `eval` or ..., the BN mode ..." line of "Adding a training method"."""
    lines = (DOCS / "development.md").read_text().splitlines()
    line = next(line for line in lines if line.startswith("- `attack_bn`:"))
    listed = set(re.findall(r"`(\w+)`", line.split(":", 1)[1].split(", the")[0]))
    modes = click_choices()[1]["attack-bn"]
    assert listed == modes, (f"development.md's attack_bn line lists {sorted(listed)}, "
                             f"robust train --attack-bn takes {sorted(modes)}")


def test_the_docs_name_modules_and_attributes_that_exist():
    wrong = [f"{page.relative_to(ROOT)}: {name}" for page in markdown_files()
             for name in sorted(named_paths(page.read_text())) if not resolves(name)]
    assert wrong == [], "README.md / docs name module paths that do not exist:\n  " + "\n  ".join(wrong)
