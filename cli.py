"""Command-line overrides for the plain settings at the top of train.py, predict.py and evaluate.py.

Each script keeps its settings as module-level variables with a short comment, between the lines
`# ---- settings` and `# ---- end of settings`. parse_settings() turns every one of them into a flag with
that comment as its help (--epochs 10, --path_to_image x.png, --no-augment for booleans), so the file stays
the one place where a setting, its default and its meaning are written.
"""
from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

_LINE = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*)\s*=\s*(?P<value>.+?)\s*(?:#\s*(?P<help>.*))?$")


def read_settings(source_file: str | Path) -> dict[str, tuple[object, str]]:
    """{name: (default value, help)} for the settings block of a script."""
    out, inside = {}, False
    for line in Path(source_file).read_text(encoding="utf-8").splitlines():
        if line.startswith("# ---- settings"):
            inside = True
            continue
        if line.startswith("# ---- end of settings"):
            break
        m = _LINE.match(line) if inside else None
        if m:
            out[m.group("name")] = (ast.literal_eval(m.group("value")), (m.group("help") or "").strip())
    return out


def parse_settings(source_file: str | Path, argv: list[str] | None = None, description: str = "",
                   positional: str | None = None) -> dict:
    """Parse argv against the script's settings; returns {name: value} with every setting present.

    positional: a setting that may also be given as bare arguments (predict.py's files).
    """
    settings = read_settings(source_file)
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (default, help_) in settings.items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        help_ = f"{help_} (default: {default!r})".replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            ap.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif isinstance(default, (int, float)):
            ap.add_argument(*flags, dest=name, type=type(default), default=default, help=help_)
        else:
            ap.add_argument(*flags, dest=name, type=str, default=default, help=help_)
    if positional:
        ap.add_argument("inputs", nargs="*", help=f"same as --{positional} (several allowed)")
    args = vars(ap.parse_args(argv))
    if positional:
        inputs = args.pop("inputs")
        if inputs:
            args[positional] = ";".join(inputs)
    return args


def markdown_flags(source_file: str | Path) -> str:
    """The settings of a script as a markdown table (the README's flag tables are made with this)."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for name, (default, help_) in read_settings(source_file).items():
        flag = f"--{name} / --no-{name}" if isinstance(default, bool) else f"--{name}"
        rows.append(f"| `{flag}` | `{default!r}` | {help_.replace('|', '/')} |")
    return "\n".join(rows)


def settings_with(source_file: str | Path, **overrides) -> dict:
    """A script's settings with their defaults, some replaced (for tests and notebooks); unknown names are an error."""
    cfg = parse_settings(source_file, [])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise KeyError(f"unknown settings {sorted(unknown)}")
    return {**cfg, **overrides}
