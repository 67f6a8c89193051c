"""docs/cli.md is the command-line reference generated from the parser, so it lists every command
and option as ``--help`` does. After changing an option, regenerate it:

    python tests/test_cli_docs.py > docs/cli.md
"""

import argparse
import sys
from pathlib import Path

from elflm.cli import build_parser

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

HEADER = """# Command-line reference

Every `elflm` command and option, as `elflm COMMAND --help` prints them (generated from the parser:
`python tests/test_cli_docs.py > docs/cli.md`). Errors are printed as one line,
`elflm COMMAND: error: …`, with exit status 2. The guides: [training](training.md),
[sampling](sampling.md), [evaluation](evaluation.md), [checkpoints](checkpoints.md),
[quickstart](quickstart.md).
"""


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def reference() -> str:
    """The Markdown reference of every command of ``elflm``."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = [HEADER]
    for name, p in sub.choices.items():
        out += [f"## `elflm {name}`", "", p.description or "", "", "| option | meaning |", "|---|---|"]
        for act in p._actions:
            if isinstance(act, argparse._HelpAction):
                continue
            if act.option_strings:
                flag = ", ".join(f"`{o}`" for o in act.option_strings)
            else:
                flag = f"`{act.dest}`" + (" …" if act.nargs in ("*", "+") else "")
            text = cell(act.help or "")
            if act.choices and act.option_strings:
                text += f" One of: {', '.join(f'`{c}`' for c in act.choices)}."
            default = act.default not in (None, False, argparse.SUPPRESS)
            if act.option_strings and default and "default" not in (act.help or ""):
                text += f" Default: `{cell(act.default)}`."
            out.append(f"| {flag} | {text.strip()} |")
        out.append("")
    return "\n".join(out)


def test_cli_reference_is_current():
    assert DOC.read_text(encoding="utf-8") == reference(), (
        "docs/cli.md is out of date: regenerate it with `python tests/test_cli_docs.py > docs/cli.md`"
    )


if __name__ == "__main__":
    sys.stdout.write(reference())
