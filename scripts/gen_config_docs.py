"""Write docs/configuration.md: every config key with its type, default and description.

    python scripts/gen_config_docs.py            # regenerate docs/configuration.md
    python scripts/gen_config_docs.py --check    # exit 1 if the committed file is stale (tests/test_docs.py)

Sources: the typed schema (arcee/train/schema.py: dataclass fields, their inline comments, enum
members) for `train.*`, `optim.*`, `logger.*` and the top level; the YAML files under configs/
(values as composed by Hydra, inline comments as descriptions) for every group option, the
experiments, `sample.yaml` and `evaluate.yaml`. The output depends only on those files.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import re
import sys
import tokenize
import typing
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from arcee.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SCHEMA = ROOT / "arcee" / "train" / "schema.py"
OUT = ROOT / "docs" / "configuration.md"
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w]*):(.*)$")


# ----------------------------------------------------------------------------- sources

def _comments(path: Path) -> dict[int, str]:
    """Line number -> text of the trailing `#` comment on that line (Python source)."""
    out = {}
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type == tokenize.COMMENT:
                out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _field_lines(path: Path) -> dict[tuple[str, str], int]:
    """(class name, field name) -> line of its annotated assignment."""
    tree = ast.parse(path.read_text())
    return {(c.name, s.target.id): s.lineno for c in tree.body if isinstance(c, ast.ClassDef)
            for s in c.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}


def _yaml_comments(path: Path) -> dict[str, str]:
    """Dotted key -> its inline comment, for a YAML file of nested mappings (lists stay values)."""
    out, stack = {}, []  # stack of (indent, key)
    for line in path.read_text().splitlines():
        m = _KEY.match(line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        value, _, comment = _split_comment(rest)
        if comment:
            out[".".join(k for _, k in stack)] = comment
    return out


def _split_comment(rest: str) -> tuple[str, str, str]:
    """'  value   # text' -> ('value', '#', 'text'), ignoring '#' inside quotes."""
    quote = None
    for i, ch in enumerate(rest):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), "#", rest[i + 1:].strip()
    return rest.strip(), "", ""


def _header(path: Path) -> tuple[str, list[str]]:
    """The leading comment block of a YAML file: (prose joined into one line, indented command lines)."""
    prose, code = [], []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].removeprefix(" ")
        if text.startswith(" "):
            code.append(text.strip())
        elif text and not text.startswith("@package"):
            prose.append(text.strip())
    return " ".join(prose), code


# ----------------------------------------------------------------------------- formatting

def _code(v) -> str:
    if isinstance(v, enum.Enum):
        v = v.value
    if isinstance(v, str):
        return f"`'{v}'`" if v in ("no", "yes", "true", "false", "null", "") else f"`{v}`"
    text = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    text = text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        return _type_name(next(a for a in args if a is not type(None))) + " or null"
    if origin in (list, typing.List):
        return f"list[{_type_name(args[0])}]"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(m.value for m in tp)
    if tp is typing.Any:
        return "node"
    return getattr(tp, "__name__", str(tp))


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(c) for c in r) + " |" for r in rows)]


# ----------------------------------------------------------------------------- sections

def _schema_section() -> list[str]:
    import arcee.train.schema as schema  # registers arcee_schema

    comments, lines_of = _comments(SCHEMA), _field_lines(SCHEMA)
    hints = {c: typing.get_type_hints(c) for c in (schema.Config, schema.TrainConfig, schema.OptimConfig,
                                                   schema.LoggerConfig)}
    out = ["## Typed nodes (`arcee/train/schema.py`)", "",
           "Every YAML file and command-line override is merged into these dataclasses when the config is",
           "composed: an unknown key or a value of the wrong type fails before anything runs. `check_config`",
           "adds the cross-key rules (ranges, `train.batch_size` divisible by `num_processes * train.grad_accum`,",
           "`data.path` present).", ""]
    for prefix, cls in (("", schema.Config), ("train.", schema.TrainConfig), ("optim.", schema.OptimConfig),
                        ("logger.", schema.LoggerConfig)):
        out += [f"### `{prefix}*`" if prefix else "### top level", "",
                (cls.__doc__ or "").strip().splitlines()[0], ""]
        rows = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            if dataclasses.is_dataclass(default):
                default_txt = f"the `{f.name}.*` node below"
            elif default == "???":
                default_txt = "required (a `configs/" + f.name + "/` option)"
            else:
                default_txt = _code(default)
            desc = comments.get(lines_of[(cls.__name__, f.name)], "")
            rows.append([f"`{prefix}{f.name}`", _type_name(hints[cls][f.name]), default_txt, desc])
        out += _table(["key", "type", "schema default", "description"], rows) + [""]
    return out


def _root_defaults() -> list[str]:
    """The `defaults:` list of configs/config.yaml with its comments."""
    out = []
    for line in (CONFIGS / "config.yaml").read_text().splitlines():
        m = re.match(r"^\s+- (\S+?)(?::\s*(\S+))?\s*(#\s*(.*))?$", line)
        if m:
            entry = m.group(1) + (f": {m.group(2)}" if m.group(2) else "")
            out.append(f"- `{entry}`" + (f": {m.group(4)}" if m.group(4) else ""))
    return out


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=overrides)


def _groups() -> list[str]:
    return sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name != "experiment")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _group_section(group: str) -> list[str]:
    options = _options(group)
    out = [f"### `{group}/`", "", f"Options: {', '.join(f'`{o}`' for o in options)}. Pick one with "
           f"`{group}=<option>`; override a key with `{group}.<key>=<value>`.", ""]
    for o in options:
        out.append(f"- `{o}`: {_header(CONFIGS / group / f'{o}.yaml')[0] or '(no description)'}")
    out.append("")
    values, comments = {}, {}
    for o in options:
        node = _compose([f"{group}={o}"])[group]
        values[o] = _flatten(OmegaConf.to_container(node, resolve=False, enum_to_str=True))
        for k, c in _yaml_comments(CONFIGS / group / f"{o}.yaml").items():
            comments.setdefault(k, {}).setdefault(c, []).append(o)
    keys = list(dict.fromkeys(k for o in options for k in values[o]))
    if group in ("train", "optim", "logger"):  # described in the schema tables above
        comments = {}
    comments = {k: _merge(by_text, len(options)) for k, by_text in comments.items()}
    rows = [[f"`{k}`", *(_code(values[o][k]) if k in values[o] else "-" for o in options), comments.get(k, "")]
            for k in keys]
    header = ["key", *(f"`{o}`" for o in options)] + (["description"] if comments else [])
    if not comments:
        rows = [r[:-1] for r in rows]
    return out + _table(header, rows) + [""]


def _merge(by_text: dict[str, list[str]], n_options: int) -> str:
    """One description from the comments the options give a key: shared text once, else per option."""
    if len(by_text) == 1 and (n_options == 1 or len(next(iter(by_text.values()))) > 1):
        return next(iter(by_text))
    return "; ".join(f"{', '.join(opts)}: {text}" for text, opts in by_text.items())


def _experiments_section() -> list[str]:
    out = ["## Experiments (`configs/experiment/`)", "",
           "A recipe sets whole groups and keys at once: `python train.py experiment=<name> [overrides]`.",
           "Files starting with `_` are shared bases, not recipes. `celebahq_*` rows need",
           "`data.path=<latent shard folder>`; see `scripts/celebahq.md` and `scripts/paper_table.sh`.", ""]
    rows = []
    for p in sorted((CONFIGS / "experiment").glob("*.yaml")):
        raw = yaml.safe_load(p.read_text()) or {}
        sets = [f"{d} (base)" if not isinstance(d, dict) else
                ", ".join(f"{k.replace('override /', '')}={v}" for k, v in d.items())
                for d in raw.pop("defaults", []) if d != "_self_"]
        sets += [f"{k}={_code(v).strip('`')}" for k, v in _flatten(raw).items()]
        rows.append([f"`{p.stem}`", _header(p)[0], " ".join(f"`{s}`" for s in sets)])
    return out + _table(["experiment", "what", "sets"], rows) + [""]


def _plain_yaml_section(name: str, title: str) -> list[str]:
    path = CONFIGS / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    raw.pop("defaults", None)
    raw.pop("hydra", None)
    comments = _yaml_comments(path)
    rows = [[f"`{k}`", "required" if v == "???" else _code(v), comments.get(k, "")] for k, v in raw.items()]
    prose, code = _header(path)
    return [f"## `{name}.yaml` ({title})", "", prose, "", "```bash", *code, "```", "",
            *_table(["key", "default", "description"], rows), ""]


def render() -> str:
    out = ["<!-- GENERATED by scripts/gen_config_docs.py from arcee/train/schema.py and configs/: do not edit;",
           "     regenerate with `python scripts/gen_config_docs.py` (tests/test_docs.py checks it is current). -->",
           "# Configuration reference", "",
           "`train.py` composes `configs/config.yaml` with Hydra; `sample.py` and `evaluate.py` read",
           "`configs/sample.yaml` and `configs/evaluate.yaml`. Override any key on the command line",
           "(`train.max_steps=2000`), pick group options (`model=zigma_s`), or a whole recipe",
           "(`experiment=celebahq_zigma1_arcee`). `python train.py --cfg job [overrides]` prints the",
           "composed config; `python train.py --help` lists the groups and options.", "",
           "Defaults of `configs/config.yaml`, in merge order (later entries win):", "", *_root_defaults(), "",
           *_schema_section(),
           "## Config groups (`configs/<group>/`)", "",
           "Values are those of each option as composed (`${...}` are interpolations resolved at run time;",
           "`model.image_size`, `in_channels`, `num_classes` follow the `data` node). The `model`, `data` and",
           "`flow` nodes are checked by `build_model`, `build_dataset`, `build_transport`, which reject unknown",
           "keys.", ""]
    for group in _groups():
        out += _group_section(group)
    out += _experiments_section()
    out += _plain_yaml_section("sample", "`python sample.py key=value ...`")
    out += _plain_yaml_section("evaluate", "`python evaluate.py key=value ...`")
    return "\n".join(out).rstrip() + "\n"



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is not up to date")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    text = render()
    if a.check:
        current = a.out.read_text() if a.out.is_file() else ""
        if current != text:
            print(f"{a.out} is stale: run python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        print(f"{a.out} is up to date")
        return 0
    atomic_write_text(a.out, text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
