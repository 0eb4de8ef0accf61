#!/usr/bin/env python
"""Write docs/config.md: every config key megdet_d2 adds to detectron2's, with its default and
meaning, from ``megdet_d2/config.py`` itself.

The keys are those of ``add_megdet_config(get_cfg())`` that a plain ``get_cfg()`` lacks, plus
the detectron2 keys whose default ``add_megdet_config`` changes. A key's meaning is the comment
in ``megdet_d2/config.py`` at the end of its line or right above it (a comment block that ends
a section header, between lines of dashes, belongs to the key below it); a key of the previous
layout is described by ``DEPRECATED_KEYS``. A key without a comment is an error: comment it in
``megdet_d2/config.py``.

    python tools/config_reference.py            # (re)write docs/config.md
    python tools/config_reference.py --check    # exit 1 if docs/config.md is not current
"""

import argparse
import ast
import io
import os
import re
import sys
import tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PY = os.path.join(REPO, "megdet_d2", "config.py")
OUTPUT = os.path.join(REPO, "docs", "config.md")
_RULE = re.compile(r"^#\s*-{10,}\s*$")
_NODE = object()  # a CfgNode in a flattened config
sys.path.insert(0, REPO)  # this checkout's megdet_d2, whatever is installed


def _dotted(node):
    """``"MODEL.CGBN.GROUP_SIZE"`` for the target ``_C.MODEL.CGBN.GROUP_SIZE``, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "_C" and parts:
        return ".".join(reversed(parts))
    return None


def _comment_above(lines, lineno):
    """The comment block right above line ``lineno`` (1-based), without its '#', as one string.

    A block that holds a section header (``# ----`` rules) contributes what follows its last
    rule, or, if the rule is the block's last line, the header between the last two rules."""
    block, i = [], lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        block.insert(0, lines[i].strip())
        i -= 1
    rules = [k for k, line in enumerate(block) if _RULE.match(line)]
    if rules and rules[-1] < len(block) - 1:
        block = block[rules[-1] + 1 :]
    elif rules:
        start = rules[-2] + 1 if len(rules) > 1 else 0
        block = block[start : rules[-1]]
    return " ".join(line.lstrip("#").strip() for line in block)


def source_comments(path=CONFIG_PY):
    """``{dotted key: (comment, value source)}`` for every ``_C.<key> = ...`` in
    ``add_megdet_config``, in source order."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.splitlines()
    trailing = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].strip() != tok.string:
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    func = next(
        node
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef) and node.name == "add_megdet_config"
    )
    found = {}
    for stmt in func.body:
        if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
            continue
        key = _dotted(stmt.targets[0])
        if key is None:
            continue
        comment = trailing.get(stmt.lineno) or _comment_above(lines, stmt.lineno)
        comment = re.sub(r"\s+", " ", comment).strip()
        found[key] = (comment, ast.get_source_segment(text, stmt.value))
    return found


def _flatten(node, prefix=""):
    from detectron2.config import CfgNode

    out = {}
    for name, value in node.items():
        key = prefix + name
        if isinstance(value, CfgNode):
            out[key] = _NODE
            out.update(_flatten(value, key + "."))
        else:
            out[key] = value
    return out


def _fmt(value):
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_fmt(v) for v in value)
        return (
            f"[{inner}]"
            if isinstance(value, list)
            else f"({inner}{',' if len(value) == 1 else ''})"
        )
    return repr(value)


def _cell(text):
    return text.replace("|", "\\|")


def collect():
    """(groups, errors): ``groups`` is [(title, description, [(key, default, meaning)])]."""
    from detectron2.config import get_cfg

    from megdet_d2.config import DEPRECATED_KEYS, add_megdet_config

    plain, full = _flatten(get_cfg()), _flatten(add_megdet_config(get_cfg()))
    comments = source_comments()
    deprecated_nodes = {k.rsplit(".", 1)[0] for k in DEPRECATED_KEYS}
    added = [k for k in full if k not in plain]
    changed = [k for k in comments if k in plain and full[k] is not _NODE]
    groups, errors = {}, []

    def node_of(key):
        if key in DEPRECATED_KEYS or key in deprecated_nodes:
            return "deprecated"
        return key.rsplit(".", 1)[0] if "." in key else "(root)"

    for key in added:
        if full[key] is _NODE:  # a node: described in its group's title
            continue
        comment, source = comments.get(key, ("", None))
        if key in DEPRECATED_KEYS:
            comment = (
                f"Deprecated name of `{DEPRECATED_KEYS[key]}`: `upgrade_config` moves a value "
                "set here to it with a FutureWarning; removed in the next release."
            )
        if not comment:
            errors.append(f"{key} has no comment in megdet_d2/config.py")
        groups.setdefault(node_of(key), []).append((key, _fmt(full[key]), comment))
    for key in changed:
        comment, source = comments[key]
        if not comment:
            errors.append(f"{key} has no comment in megdet_d2/config.py")
        default = f"`{source}`" if source else f"`{_fmt(full[key])}`"
        groups.setdefault("changed", []).append((key, default, comment))

    ordered = []
    for node in groups:
        if node in ("deprecated", "changed"):
            continue
        description = comments.get(node, ("", None))[0]
        ordered.append((f"`{node}.*`", description, groups[node]))
    if "changed" in groups:
        ordered.append(("detectron2 keys whose default megdet_d2 changes", "", groups["changed"]))
    if "deprecated" in groups:
        ordered.append(
            (
                "Deprecated names (previous layout)",
                "Still load for one release.",
                groups["deprecated"],
            )
        )
    return ordered, errors


def render(groups):
    out = [
        "# Configuration reference",
        "",
        "Every config key `megdet_d2.add_megdet_config(cfg)` adds to Detectron2's, with its",
        "default and meaning, grouped by node; plus the detectron2 defaults it changes.",
        "",
        "<!-- generated by tools/config_reference.py from megdet_d2/config.py; do not edit -->",
        "Generated by `python tools/config_reference.py` from the comments in",
        "`megdet_d2/config.py`; do not edit (`tests/test_docs.py` checks that it is current).",
        "",
    ]
    for title, description, rows in groups:
        out += [f"## {title}", ""]
        if description:
            out += [description, ""]
        out += ["| key | default | meaning |", "|---|---|---|"]
        for key, default, meaning in rows:
            default = default if default.startswith("`") else f"`{default}`"
            out.append(f"| `{key}` | {_cell(default)} | {_cell(meaning)} |")
        out.append("")
    return "\n".join(out)


def generate():
    """(text of docs/config.md, errors): errors name every key without a comment."""
    groups, errors = collect()
    return render(groups), errors


def check(path=OUTPUT):
    """None if ``path`` holds what :func:`generate` writes, else a one-line message."""
    expected, errors = generate()
    if errors:
        return "; ".join(errors)
    try:
        with open(path, encoding="utf-8") as f:
            current = f.read()
    except FileNotFoundError:
        current = None
    if current != expected:
        rel = os.path.relpath(path, REPO)
        return f"{rel} is not current: run `python tools/config_reference.py`"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not current")
    parser.add_argument("--output", default=OUTPUT, help="default: docs/config.md")
    args = parser.parse_args(argv)
    if args.check:
        message = check(args.output)
        if message:
            print(message, file=sys.stderr)
            return 1
        print(f"{os.path.relpath(args.output, REPO)} is current")
        return 0
    text, errors = generate()
    if errors:
        print("; ".join(errors), file=sys.stderr)
        return 1
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(args.output, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
