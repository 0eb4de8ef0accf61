"""README.md and docs/*.md stay true to the repository.

* every relative link (and its ``#anchor``) and every repo path written in backticks or in a
  code block exists;
* every script they name (``train_net.py``, ``benchmarks/``, ``tools/``, ``experiments/``,
  ``scripts/*.sh``) answers ``--help`` with exit status 0;
* README.md is at most 250 lines; each docs page opens with a summary of at most two lines;
* docs/config.md is what ``tools/config_reference.py`` generates from megdet_d2/config.py.
"""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from tests.utils.scripts import load_script

config_reference = load_script("tools/config_reference.py")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))
)
README_MAX_LINES = 250

# Paths written in the docs that are not in the repository, on purpose.
ALLOWED_PREFIXES = {
    "output/": "training outputs, written by the runs",
    "datasets/": "the quickstart data, generated on first use",
    "data/": "the user's own data in the COCO_INSTANCES example",
    "OUTDIR/": "the folder given to scripts/gpu_check.sh",
    "OUTPUT_DIR/": "a run's output folder (the key OUTPUT_DIR)",
    ".venv/": "made by make setup",
    ".whl": "filled by scripts/gpu_wheels.sh",
    "path/to/": "a placeholder",
    "/tmp/": "temporary files",
}
ALLOWED_NAMES = {
    "config.yaml": "dumped into OUTPUT_DIR by every run",
    "metrics.json": "written into OUTPUT_DIR by every run",
    "coco_metrics.json": "written by every evaluation",
    "report.md": "written by scripts/gpu_check.sh into OUTDIR",
    "my_config.yaml": "the user's own config in the usage example",
    "model_final.pth": "written by training",
    "train.json": "the user's own data in the COCO_INSTANCES example",
}
EXTENSIONS = (".py", ".yaml", ".yml", ".sh", ".md", ".png", ".json", ".txt", ".cfg", ".toml")
SCRIPT = re.compile(
    r"^(train_net\.py|(benchmarks|tools|experiments)/[\w-]+\.py|scripts/[\w-]+\.sh)$"
)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_TOKEN = re.compile(r"^[\w.\-/*\[\]]+$")


def _read(page):
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


def _split_code(text):
    """(prose, code): the text outside fenced code blocks and inside them."""
    prose, code, inside = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        (code if inside else prose).append(line)
    return "\n".join(prose), "\n".join(code)


def _top_level():
    return set(os.listdir(REPO))


def _looks_like_path(token, top):
    token = token.rstrip(".,;:)")
    if not re.search(r"\w", token) or "://" in token or not _TOKEN.match(token):
        return None
    if token.startswith("-"):
        return None
    first = token.split("/", 1)[0]
    if token.endswith(EXTENSIONS) or ("/" in token and (first in top or token.endswith("/"))):
        return token
    if any(token.startswith(p) for p in ALLOWED_PREFIXES):
        return token
    return None


def written_paths(page):
    """Every repo-like path written in ``page``: in backticks, in code blocks, as link targets
    (links resolved against the page's folder, the others against the repository root)."""
    top = _top_level()
    prose, code = _split_code(_read(page))
    found = []
    for span in _CODE_SPAN.findall(prose):
        for token in span.split():
            path = _looks_like_path(token.strip("\"'"), top)
            if path:
                found.append(("code", path))
    for token in re.split(r"[\s=\"'(),]+", code):
        path = _looks_like_path(token, top)
        if path and (path.endswith(EXTENSIONS) or path.split("/", 1)[0] in top):
            found.append(("code", path))
    for target in _LINK.findall(prose):
        if not re.match(r"^(https?:|mailto:)", target):
            found.append(("link", target))
    return found


def _slugs(page):
    """GitHub's anchors of the headings of ``page``."""
    slugs = set()
    for line in _read(page).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            slugs.add(slug)
    return slugs


def _missing(page, kind, path):
    """Why ``path`` (written in ``page``) does not resolve, or None. ``a[-b].yaml`` (an optional
    part) stands for both ``a.yaml`` and ``a-b.yaml``."""
    optional = re.search(r"\[([^\]]*)\]", path)
    if optional and kind == "code":
        without = path[: optional.start()] + path[optional.end() :]
        with_part = path[: optional.start()] + optional.group(1) + path[optional.end() :]
        return _missing(page, kind, without) or _missing(page, kind, with_part)
    if kind == "link":
        target, _, anchor = path.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
        if not os.path.exists(os.path.join(REPO, resolved)):
            return f"link to {path}: {resolved} does not exist"
        if anchor and resolved.endswith(".md") and anchor not in _slugs(resolved):
            return f"link to {path}: no heading #{anchor} in {resolved}"
        return None
    if any(path.startswith(p) for p in ALLOWED_PREFIXES):
        return None
    if "/" not in path:
        if path in ALLOWED_NAMES or path in _tracked_basenames():
            return None
        return f"`{path}`: no file of that name in the repository"
    if glob.glob(os.path.join(REPO, path)):
        return None
    return f"`{path}` does not exist"


_BASENAMES = []


def _tracked_basenames():
    if not _BASENAMES:
        files = subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
        _BASENAMES.append({os.path.basename(f) for f in files} | set(os.listdir(REPO)))
    return _BASENAMES[0]


@pytest.mark.parametrize("page", PAGES)
def test_written_paths_exist(page):
    problems = [m for kind, path in written_paths(page) if (m := _missing(page, kind, path))]
    assert not problems, f"{page}:\n" + "\n".join(problems)


def named_scripts():
    scripts = set()
    for page in PAGES:
        for _, path in written_paths(page):
            if SCRIPT.match(path):
                scripts.add(path)
    return sorted(scripts)


# Runs each Python script as ``python SCRIPT --help`` would (``__main__``, its folder first on
# sys.path, argv), one after another in ONE interpreter: torch and detectron2 are imported once
# instead of once per script. Prints one JSON line per script: [script, exit status, output].
_HELP_RUNNER = """
import contextlib, io, json, os, runpy, sys
for script in sys.argv[1:]:
    out = io.StringIO()
    path, code = sys.path[:], 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        code, _ = 1, out.write(f"{type(e).__name__}: {e}")
    sys.path[:] = path
    print(json.dumps([script, code, out.getvalue()]), flush=True)
"""


def _help_all(scripts):
    """``[(script, exit status, output)]`` of ``--help`` for every script."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["PYTHONWARNINGS"] = "ignore"
    python = [s for s in scripts if s.endswith(".py")]
    results = []
    for script in (s for s in scripts if s.endswith(".sh")):
        proc = subprocess.run(["bash", script, "--help"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        results.append((script, proc.returncode, proc.stdout + proc.stderr))
    proc = subprocess.run([sys.executable, "-c", _HELP_RUNNER, *python], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [line[0] for line in lines] == python, proc.stdout[-2000:] + proc.stderr[-2000:]
    return results + [tuple(line) for line in lines]


def test_named_scripts_answer_help():
    scripts = named_scripts()
    assert "train_net.py" in scripts and any(s.endswith(".sh") for s in scripts)
    results = _help_all(scripts)
    failed = [f"{s}: exit {rc}\n{out[-500:]}" for s, rc, out in results if rc != 0]
    assert not failed, "\n".join(failed)
    quiet = [s for s, rc, out in results if "usage" not in out.lower()]
    assert not quiet, f"no usage line from --help: {quiet}"


def test_help_check_catches_a_script_without_help(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nsys.exit(3)\n")
    plain = tmp_path / "plain.py"
    plain.write_text("print('hello')\n")
    results = {s: (rc, out) for s, rc, out in _help_all([str(broken), str(plain)])}
    assert results[str(broken)][0] == 3
    assert results[str(plain)] == (0, "hello\n")  # exit 0 but no usage line: caught above


def test_readme_is_short():
    lines = len(_read("README.md").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def opening_summary(page):
    """The first paragraph after the page's title, as its lines."""
    lines = _read(page).splitlines()
    assert lines and lines[0].startswith("# "), f"{page} does not start with a '# ' title"
    paragraph = []
    for line in lines[1:]:
        if not line.strip():
            if paragraph:
                break
            continue
        paragraph.append(line)
    return paragraph


@pytest.mark.parametrize("page", [p for p in PAGES if p.startswith("docs")])
def test_docs_page_opens_with_a_summary(page):
    summary = opening_summary(page)
    assert 1 <= len(summary) <= 2, f"{page}: the summary after the title has {len(summary)} lines"
    assert not re.match(
        r"^\s*([#|>*-]|```|<!--|\d+\.)", summary[0]
    ), f"{page}: the title is followed by {summary[0]!r}, not a summary"


def test_config_reference_is_current():
    message = config_reference.check()
    assert message is None, message


# --- the checks themselves can fail ------------------------------------------------------------


def test_path_check_catches_a_missing_file(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "See `tools/no_such_tool.py`, [a page](no_such.md), [x](README.md#no-such-heading)\n"
        "```bash\npython benchmarks/no_such_bench.py --iters 3\n```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "_read", lambda p: page.read_text())
    found = written_paths("README.md")
    problems = [m for kind, path in found if (m := _missing("README.md", kind, path))]
    assert len(problems) == 4, problems


def test_summary_check_catches_a_missing_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "_read", lambda p: "# Title\n\n## Section\ntext\n")
    assert opening_summary("docs/x.md")[0] == "## Section"
    with pytest.raises(AssertionError):
        test_docs_page_opens_with_a_summary("docs/x.md")


def test_config_reference_check_catches_a_stale_file(tmp_path):
    stale = tmp_path / "config.md"
    stale.write_text("# Configuration reference\n")
    assert "is not current" in config_reference.check(str(stale))


def test_config_reference_needs_a_comment_per_key(tmp_path, monkeypatch):
    source = tmp_path / "config.py"
    source.write_text(
        "def add_megdet_config(cfg):\n"
        "    _C = cfg\n"
        "    # documented\n"
        "    _C.MEGDET.A = 1\n"
        "    _C.MEGDET.B = 2  # trailing\n"
        "\n"
        "    _C.MEGDET.C = 3\n"
    )
    comments = config_reference.source_comments(str(source))
    assert comments["MEGDET.A"][0] == "documented"
    assert comments["MEGDET.B"][0] == "trailing"
    assert comments["MEGDET.C"][0] == ""
    real = config_reference.source_comments()
    without = dict(real, **{"MODEL.CGBN.GROUP_SIZE": ("", "0")})
    monkeypatch.setattr(config_reference, "source_comments", lambda: without)
    _, errors = config_reference.collect()
    assert errors == ["MODEL.CGBN.GROUP_SIZE has no comment in megdet_d2/config.py"]
