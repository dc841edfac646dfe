"""mkdocs hook: the CLI and configuration reference pages, generated from the code at build time.

The CLI page walks ``qstudy.cli.build_parser()``; the configuration page reads each config
dataclass's source (field names, annotations, defaults, and the comment lines above or beside
each field) with ``ast`` and ``tokenize``. Nothing is copied by hand, so neither page can drift
from the code it documents. Images kept beside the code they belong to (dashboard screenshots,
benchmark plots) are published under ``assets/`` from where they live, not copied into docs/.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import sys
import textwrap
import tokenize
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[2]
# The checkout's own package, not whichever qstudy the environment has installed. Imported here:
# mkdocs restores sys.path once this module has loaded.
sys.path.insert(0, str(REPO / "platform"))
import qstudy.cli  # noqa: E402
import qstudy.config  # noqa: E402
import qstudy.methods  # noqa: E402
import qstudy.study.space  # noqa: E402

# Repository files published as docs assets: docs path -> repository path.
ASSETS = {
    "assets/pareto.png": "dashboards/screenshots/pareto.png",
    "assets/mlflow_ui.png": "dashboards/screenshots/mlflow_ui.png",
    "assets/terminal.png": "dashboards/screenshots/terminal.png",
    "assets/search_efficiency.png": "bench/data/search_efficiency.png",
}

# (section key in a run config YAML, dataclass) in the order a run config lists them.
RUN_CONFIG_SECTIONS = ("data", "model", "train", "eval")


def on_files(files, config):
    for src_uri, repo_path in ASSETS.items():
        files.append(File.generated(config, src_uri, abs_src_path=str(REPO / repo_path)))
    files.append(File.generated(config, "reference/cli.md", content=cli_page()))
    files.append(File.generated(config, "reference/config.md", content=config_page()))
    return files


# -- the command line ------------------------------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser, prefix: str):
    """``(command line, help, parser)`` for every leaf command, depth first, in definition order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                line = f"{prefix} {name}"
                nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                if nested:
                    yield from _subcommands(sub, line)
                else:
                    yield line, helps.get(name), sub


def _cell(text) -> str:
    """One table cell's text. A pipe inside a code span stays (Python-Markdown's tables skip code spans)."""
    return str(text).replace("\n", " ")


def _argument_row(action: argparse.Action) -> str:
    if action.option_strings:
        name = ", ".join(f"`{option}`" for option in action.option_strings)
        if action.nargs != 0:
            name += f" `{action.metavar or action.dest.upper()}`"
    else:
        name = f"`{action.metavar or action.dest}`"
        if action.nargs in ("+", "*"):
            name += " ..."
        if action.nargs in ("?", "*"):
            name += " (optional)"
    details = []
    if action.choices:
        details.append("one of " + ", ".join(f"`{choice}`" for choice in action.choices))
    if action.required and action.option_strings:
        details.append("required")
    elif action.nargs != 0 and not any(action.default is skip for skip in (None, False, argparse.SUPPRESS)):
        details.append(f"default `{action.default}`")
    help_text = (action.help or "").replace("%%", "%")
    return f"| {name} | {_cell(help_text)} | {_cell('; '.join(details))} |"


def cli_page() -> str:
    parser = qstudy.cli.build_parser()
    lines = [
        "# Command-line reference",
        "",
        "Generated from `qstudy.cli.build_parser()` when the docs are built: every command, argument",
        "and default below is the parser's own. `qstudy -v COMMAND ...` logs training progress and",
        "each trial's own output.",
        "",
        "Exit codes: 0 on success; 2 with one line `qstudy: ...` on stderr for a bad input (a config",
        "field, an option, a file); 130 after Ctrl-C (a study says how to resume it); 1 when",
        "`qstudy caption` could not decode some video.",
        "",
    ]
    for line, help_text, sub in _subcommands(parser, "qstudy"):
        sub.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100)
        usage = " ".join(sub.format_usage().split())
        usage = usage.removeprefix("usage: ")
        lines += [f"## `{line}`", "", (help_text or "").replace("%%", "%") + ("." if help_text else ""), "",
                  "```text", usage, "```", ""]
        rows = [_argument_row(a) for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        if rows:
            lines += ["| argument | meaning | |", "|---|---|---|", *rows, ""]
    return "\n".join(lines)


# -- the configuration dataclasses ---------------------------------------------------------------------

def _comments_by_line(source: str) -> dict[int, str]:
    """Line number (1-based) -> the comment on that line, without its ``#``."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return comments


def dataclass_fields(cls) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, comment)`` of each field ``cls`` itself declares, from its source.

    The comment is the run of comment lines directly above the field plus one beside it.
    ClassVars and private fields (``_name``) are not configuration and are left out.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = _comments_by_line(source)
    fields = []
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        name = node.target.id
        annotation = ast.get_source_segment(source, node.annotation)
        if name.startswith("_") or annotation.startswith("ClassVar"):
            continue
        above = []
        number = node.lineno - 1
        while number >= 1 and lines[number - 1].strip().startswith("#"):
            above.insert(0, comments[number])
            number -= 1
        if node.end_lineno in comments:
            above.append(comments[node.end_lineno])
        fields.append((name, annotation, _default(source, node.value), " ".join(above)))
    return fields


def _default(source: str, value: ast.expr | None) -> str:
    if value is None:
        return "required"
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        for keyword in value.keywords:
            if keyword.arg == "default_factory":
                factory = keyword.value
                if isinstance(factory, ast.Lambda):
                    return f"`{ast.get_source_segment(source, factory.body)}`"
                return f"`{ast.get_source_segment(source, factory)}()` defaults"
            if keyword.arg == "default":
                return f"`{ast.get_source_segment(source, keyword.value)}`"
    return f"`{ast.get_source_segment(source, value)}`"


def _doc_summary(cls) -> str:
    """The docstring's first paragraph, its reStructuredText literals as Markdown ones."""
    return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split()).replace("``", "`")


def all_fields(cls) -> list[tuple[str, str, str, str]]:
    """:func:`dataclass_fields` of ``cls`` and its dataclass bases, base fields first, as dataclasses order them."""
    merged = {}
    for klass in reversed(cls.__mro__):
        if "__dataclass_fields__" in vars(klass):
            for row in dataclass_fields(klass):
                merged[row[0]] = row
    return list(merged.values())


def _field_table(cls, prefix: str) -> list[str]:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, annotation, default, comment in all_fields(cls):
        comment = comment.replace("``", "`")
        rows.append(f"| `{prefix}{name}` | `{annotation}` | {default} | {_cell(comment)} |")
    return rows


def _source_link(cls) -> str:
    path = Path(inspect.getsourcefile(cls)).resolve().relative_to(REPO)
    return f"`{path}` (`{cls.__name__}`)"


def config_page() -> str:
    RunConfig, ADAPTERS, SpaceFile = qstudy.config.RunConfig, qstudy.methods.ADAPTERS, qstudy.study.space.SpaceFile
    hints = {name: annotation for name, annotation, _, _ in dataclass_fields(RunConfig)}

    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses' own source when the docs are built: each field's",
        "name, type and default, and the comment the code gives it. A YAML file is validated into",
        "these dataclasses before anything runs; an unknown key or a bad value fails naming its",
        "dotted path (`train.learning_rate`). [Concepts](../concepts.md) says how they fit together.",
        "",
        "## Run config",
        "",
        f"{_doc_summary(RunConfig)} Every trial of a study runs one too. Defined in {_source_link(RunConfig)}.",
        "",
        *_field_table(RunConfig, ""),
        "",
    ]
    for section in RUN_CONFIG_SECTIONS:
        cls = getattr(qstudy.config, hints[section].split(" ")[0])
        lines += [f"### `{section}:`", "", f"{_doc_summary(cls)} Defined in {_source_link(cls)}.", "",
                  *_field_table(cls, f"{section}."), ""]
    lines += [
        "### `adapter:`",
        "",
        "`adapter.method` picks the method; the other keys are that method's fields. Every",
        "registered method ([Methods](../methods.md) says what each trains):",
        "",
    ]
    for method, cls in sorted(ADAPTERS.items()):
        fields = _field_table(cls, "adapter.")
        lines += [f"#### `method: {method}`", "", f"{_doc_summary(cls)} Defined in {_source_link(cls)}.", ""]
        lines += (fields if len(fields) > 2 else ["No hyperparameters of its own."]) + [""]
    lines += [
        "## Search space",
        "",
        f"What `qstudy study SPACE.yaml` reads: {_doc_summary(SpaceFile)} Defined in {_source_link(SpaceFile)}.",
        "Each arm maps dotted run-config keys to `{choices: [...]}`, `{low: L, high: H}` (with",
        "optional `log: true` and `step`), or a bare value that pins the key for that arm.",
        "",
        *_field_table(SpaceFile, ""),
        "",
    ]
    return "\n".join(lines)
