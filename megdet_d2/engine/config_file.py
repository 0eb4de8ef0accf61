"""Merge ``--config-file`` and the command line into a config, with one-line errors.

Detectron2's ``merge_from_file`` / ``merge_from_list`` fail with a YAML parser traceback, a bare
``KeyError`` or an ``AssertionError`` ("Override list has odd length"); here each fault is a
``ConfigError`` naming the file (and line) or the key, with the fix. The YAML chain (``_BASE_``
files) is read first, so the merge also reports *where* every key was set
(:func:`merge_config`'s return value), which lets a schedule preset tell a value the user wrote
after choosing it from one the preset is meant to replace.
"""

import difflib
import os
import re

import yaml

from ..config import upgrade_config
from ..errors import ConfigError

__all__ = ["COMMAND_LINE", "config_keys", "merge_config", "set_after", "yaml_chain"]

COMMAND_LINE = "on the command line"

_TYPE_MISMATCH = re.compile(
    r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values \((.*) vs\. (.*)\) "
    r"for config key: (\S+)",
    re.S,
)


def config_keys(node, prefix=""):
    """Every dotted leaf key of a config (or nested dict)."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from config_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _read_yaml(path):
    """The mapping in YAML file ``path``; python tags allowed, as detectron2 allows them."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read ({e.strerror})") from None
    try:
        try:
            data = yaml.safe_load(text)
        except yaml.constructor.ConstructorError:  # e.g. !!python/tuple, as detectron2 allows
            data = yaml.unsafe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"config file {path!r}{where}: {problem}; this is not valid YAML, fix the syntax "
            "there (KEY: value, nested keys indented)"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path!r} holds a {type(data).__name__}, not KEY: value pairs; "
            "give a detectron2 YAML config"
        )
    return data


def yaml_chain(config_file, _including=()):
    """``[(path, dict), ...]`` from the root ``_BASE_`` file to ``config_file``, each without
    its ``_BASE_`` key; missing, cyclic or unparsable files are a ``ConfigError``."""
    data = _read_yaml(config_file)
    base = data.pop("_BASE_", None)
    if not base:
        return [(config_file, data)]
    if not isinstance(base, str):
        raise ConfigError(f"config file {config_file!r} has _BASE_: {base!r}; give one path")
    resolved = os.path.expanduser(base)
    if resolved.startswith(("http://", "https://")):  # detectron2 downloads these
        return [(config_file, data)]
    if not os.path.isabs(resolved):  # detectron2: relative to the including file
        resolved = os.path.join(os.path.dirname(config_file), resolved)
    if not os.path.isfile(resolved):
        raise ConfigError(
            f"config file {config_file!r} has _BASE_: {base!r}, i.e. {resolved!r}, which does "
            "not exist; fix the path (a relative _BASE_ starts at the including file's folder)"
        )
    if os.path.realpath(resolved) in _including:
        raise ConfigError(f"config file {config_file!r}: _BASE_ {base!r} includes itself")
    chain = yaml_chain(resolved, _including + (os.path.realpath(config_file),))
    return chain + [(config_file, data)]


def _at(where):
    return where if where == COMMAND_LINE else f"in {where!r}"


def _unknown_key(cfg, key, where):
    close = difflib.get_close_matches(key, list(config_keys(cfg)), n=3, cutoff=0.75)
    hint = f" (did you mean {close}?)" if close else ""
    return ConfigError(
        f"{key} {_at(where)} is not a config key{hint}; fix its spelling or remove it (MegDet's "
        "keys exist after megdet_d2.add_megdet_config)"
    )


def _merge_error(cfg, error, where):
    """A yacs / detectron2 merge exception as a one-line ``ConfigError`` naming ``where``."""
    text = str(error.args[0]) if error.args else type(error).__name__
    if isinstance(error, KeyError) and "Non-existent config key: " in text:
        return _unknown_key(cfg, text.rsplit(": ", 1)[1], where)
    if isinstance(error, AssertionError) and text.startswith("Non-existent key: "):
        return _unknown_key(cfg, text.rsplit(": ", 1)[1], where)
    match = _TYPE_MISMATCH.search(text)
    if match:
        want, got, default, value, key = match.groups()
        return ConfigError(
            f"{key}={value} {_at(where)} is of type {got} where {want} is expected (default "
            f"{default}); give a value of type {want}"
        )
    return ConfigError(f"{_at(where)}: {text.splitlines()[0] if text else type(error).__name__}")


def _key_without_value(cfg, opts):
    """The first command-line KEY whose VALUE is missing (the list has odd length)."""
    keys = set(config_keys(cfg))
    for i in range(0, len(opts), 2):
        if i + 1 == len(opts) or opts[i + 1] in keys:
            return opts[i]
    return opts[-1]


def merge_config(cfg, config_file, opts):
    """Merge ``config_file`` (with its ``_BASE_`` chain) and then ``opts`` into ``cfg``.

    Returns:
        ``{dotted key: (order, where)}`` for every key a YAML file or the command line sets:
        ``where`` is the file (the last one of the chain that sets it) or
        :data:`COMMAND_LINE`; ``order`` is the file's position in the chain (root first), or
        the chain length for the command line.
    """
    if not config_file:
        raise ConfigError(
            "--config-file is missing; name a YAML config, e.g. "
            "--config-file configs/quickstart/shapes_R18_FPN.yaml"
        )
    if not os.path.isfile(config_file):
        raise ConfigError(f"--config-file {config_file!r} does not exist; give a YAML file")
    chain = yaml_chain(config_file)
    sources = {}
    for order, (path, data) in enumerate(chain):
        for key in config_keys(data):
            sources[key] = (order, path)
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        text = str(e.args[0]) if e.args else ""
        key = text.rsplit(": ", 1)[-1]
        raise _merge_error(cfg, e, sources.get(key, (0, config_file))[1]) from None

    opts = list(opts)
    if len(opts) % 2:
        key = _key_without_value(cfg, opts)
        raise ConfigError(
            f"{key} on the command line has no value; overrides come in KEY VALUE pairs, "
            f"e.g. SOLVER.MAX_ITER 1000"
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise _merge_error(cfg, e, COMMAND_LINE) from None
        sources[key] = (len(chain), COMMAND_LINE)
    for old, new in upgrade_config(cfg).items():  # deprecated names, with a FutureWarning
        for key in [k for k in sources if k == old]:
            sources[new] = sources.pop(key)
    return sources


def set_after(sources, key):
    """``{k: where}`` of the keys set deliberately after ``key``: on the command line, or in a
    YAML file that inherits (``_BASE_``) from the one setting ``key``; ``where`` reads e.g.
    "on the command line" or "in 'configs/x.yaml'". ``sources``: :func:`merge_config`'s."""
    order = sources.get(key, (-1, None))[0]
    return {
        k: _at(where) for k, (o, where) in sources.items() if where == COMMAND_LINE or o > order
    }
