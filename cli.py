"""Command-line overrides for the plain settings at the top of train.py, predict.py and evaluate.py.

Each script keeps its settings as module-level variables with a short comment, between the lines
`# ---- settings` and `# ---- end of settings`. parse_settings() turns every one of them into a flag with
that comment as its help (--epochs 10, --path_to_image x.png, --no-augment for booleans), so the file stays
the one place where a setting, its default and its meaning are written.

A script with a `config` setting also takes a recipe file (nanoGPT's pattern): `python train.py configs/x.py
--epochs 3` reads the assignments of configs/x.py (plain `name = value` lines of the same settings, literal values
only), then the command line overrides them. The recipe's name lands in `config`.
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


class RecipeError(ValueError):
    """A recipe file that cannot be used; the message names the file and the line."""


REPO = Path(__file__).resolve().parent


def _recipe_path(name: str) -> Path:
    """A recipe named on the command line or by a `base` line: as given, else relative to this repository."""
    p = Path(name)
    return p if p.exists() or p.is_absolute() else REPO / p


def recipe_chain(path: str | Path) -> list[Path]:
    """The recipe file and the files it builds on (`base = "configs/x.py"`, first line), base first."""
    chain: list[Path] = []
    p: Path | None = _recipe_path(str(path))
    while p is not None:
        if p.resolve() in [c.resolve() for c in chain]:
            raise RecipeError(f"{p}: recipe files build on each other in a circle")
        chain.insert(0, p)
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (OSError, SyntaxError):
            break  # read_recipe reports it
        bases = [n.value.value for n in tree.body if isinstance(n, ast.Assign) and len(n.targets) == 1
                 and getattr(n.targets[0], "id", "") == "base" and isinstance(n.value, ast.Constant)]
        p = _recipe_path(bases[0]) if bases else None
    return chain


def read_recipe(path: str | Path, settings: dict[str, tuple[object, str]]) -> dict:
    """{name: value} of a recipe file: top-level `name = literal` assignments of known settings (a docstring and
    comments are allowed; anything else is an error naming the file and line). Values must have the setting's
    type (an int where a float is expected is accepted). A recipe may build on another: `base = "configs/x.py"`
    takes that file's values first (an ablation arm is its baseline plus the one thing it changes)."""
    out: dict = {}
    for p in recipe_chain(path):
        out.update(_read_one_recipe(p, settings))
    return out


def _read_one_recipe(path: Path, settings: dict[str, tuple[object, str]]) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe file ({e.strerror or e})") from None
    except SyntaxError as e:
        raise RecipeError(f"{path}:{e.lineno}: not valid Python ({e.msg})") from None
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise RecipeError(f"{path}:{node.lineno}: a recipe holds only `name = value` lines")
        name = node.targets[0].id
        if name == "base":
            continue  # recipe_chain follows it
        if name not in settings:
            raise RecipeError(f"{path}:{node.lineno}: unknown setting {name!r}")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise RecipeError(f"{path}:{node.lineno}: {name} must be a literal value (number, string, True/False)") \
                from None
        default = settings[name][0]
        ok = (isinstance(value, bool) if isinstance(default, bool) else
              isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float) else
              isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int) else
              isinstance(value, type(default)))
        if not ok:
            raise RecipeError(f"{path}:{node.lineno}: {name} = {value!r} but the setting is a "
                              f"{type(default).__name__} (default {default!r})")
        out[name] = float(value) if isinstance(default, float) else value
    return out


def recipe_from_argv(argv: list[str]) -> tuple[str, list[str]]:
    """(recipe file, remaining argv): a first argument ending in .py, or the value of --config."""
    if argv and argv[0].endswith(".py") and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if a.startswith("--config="):
            return a.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return "", list(argv)


def parse_settings(source_file: str | Path, argv: list[str] | None = None, description: str = "",
                   positional: str | None = None) -> dict:
    """Parse argv against the script's settings; returns {name: value} with every setting present.

    positional: a setting that may also be given as bare arguments (predict.py's files).
    A script with a `config` setting takes a recipe file first (see the module docstring); flags override it.
    """
    import sys
    settings = read_settings(source_file)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "config" in settings:
        recipe, argv = recipe_from_argv(argv)
        if recipe:
            values = read_recipe(recipe, settings)
            values.pop("config", None)
            settings = {k: (values.get(k, d), h) for k, (d, h) in settings.items()}
            settings["config"] = (recipe, settings["config"][1])
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
    """The settings of a script as a markdown table (docs/flags.md is made of these: flags_document())."""
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


FLAG_SCRIPTS = ("train.py", "predict.py", "evaluate.py", "app.py", "loso.py", "ablation.py")


def flags_document(root: str | Path = REPO) -> str:
    """docs/flags.md: every flag of the scripts in FLAG_SCRIPTS, one table each (markdown_flags)."""
    parts = ["# Every flag", "",
             "This file is generated by `python cli.py --write-flags docs/flags.md` from the settings at the top of each",
             "script; edit the scripts, not this file, then run that command again.",
             "",
             "Each script keeps its settings as plain variables at the top of the file, each with a comment; edit them",
             "there, or give any of them on the command line (`--name value`, with dashes or underscores; `--no-name` for",
             "booleans). `predict.py` also takes its inputs as bare arguments, `loso.py` its recipe. `train.py` also takes",
             "a recipe file first (`python train.py configs/x.py --epochs 10`: the file's values, then the flags; see",
             "[training.md](training.md#recipes)).", ""]
    for script in FLAG_SCRIPTS:
        parts += [f"#### {script}", "", markdown_flags(Path(root) / script), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write docs/flags.md, the flag tables of the scripts, from their settings.")
    ap.add_argument("--write-flags", dest="write_flags", metavar="FILE", required=True,
                    help="the Markdown file to (re)write, e.g. docs/flags.md")
    args = ap.parse_args(argv)
    out = Path(args.write_flags)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(flags_document(), encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out} ({', '.join(FLAG_SCRIPTS)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
