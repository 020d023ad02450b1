"""Run config files (configs/*.py, or a user's own) loaded by path, from any working directory.

The library never imports configs/ (setup.py does not install it); a config file is user input,
named by path like a data folder. Config files live in a package and import their siblings
(`from configs import common`), so the package's parent goes on sys.path before one is loaded:
what running from the repository root used to do by accident, done for any config location.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
import sys
import types
from collections.abc import Callable
from typing import Any

import ml_collections

# This checkout's configs/: defaults for the bench scripts, which run from a source checkout.
REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def in_repo(name: str) -> str:
    """The path of configs/<name> in this checkout (e.g. 'kinetics.py')."""
    return os.path.join(REPO_CONFIGS, name)


def make_importable(path: str) -> None:
    """Puts the parent of the package holding config file `path` on sys.path (if it is in one)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(os.path.join(folder, "__init__.py")):
        root = os.path.dirname(folder)
        if root not in sys.path:
            sys.path.insert(0, root)


def config_path_in_argv(argv: list[str], flag: str = "config") -> str | None:
    """The file of `--config=path[:arg]` (or `--config path[:arg]`) in a command line, if any."""
    spec = config_spec_in_argv(argv, flag)
    return None if spec is None else spec[0]


def config_spec_in_argv(argv: list[str], flag: str = "config") -> tuple[str, str | None] | None:
    """(path, arg or None) of `--config=path[:arg]` (or `--config path[:arg]`) in a command line, if any."""
    for i, item in enumerate(argv):
        if item.startswith(f"--{flag}="):
            value = item.split("=", 1)[1]
        elif item == f"--{flag}" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        path, _, arg = value.partition(":")
        return path, arg or None
    return None


def unknown_field(argv: list[str], sections: dict[str, Callable[[], ml_collections.ConfigDict]],
                  hints: dict[str, str] | None = None) -> str | None:
    """The first `--<name>.a.b=value` of a command line whose config lacks field a.b, as one line naming the
    closest fields (ml_collections fails on it with a bare KeyError), or None.

    Args:
      sections: flag name -> its config (made on demand), e.g. {'sample': sample.sample_config}.
      hints: 'name.a.b' of fields that do not exist but are looked for -> where that setting lives.
    """
    hints = hints or {}
    made: dict[str, ml_collections.ConfigDict] = {}
    for item in argv:
        match = re.match(r"^--?(?:no)?([A-Za-z_]\w*)\.([\w.]+)(?:=|$)", item)
        if match is None or match.group(1) not in sections:
            continue
        name, path = match.groups()
        if name not in made:
            made[name] = sections[name]()
        node, walked = made[name], [name]
        for key in path.split("."):
            where = ".".join(walked)
            if not isinstance(node, ml_collections.ConfigDict):
                return f"--{name}.{path}: --{where} is a value, not a section; set --{where}=VALUE."
            if key not in node:
                known = {h.rsplit(".", 1)[1]: advice for h, advice in hints.items() if h.rsplit(".", 1)[0] == where}
                close = difflib.get_close_matches(key, [*map(str, node.keys()), *known], n=3, cutoff=0.6)
                if close and close[0] in known:
                    fix = f"{known[close[0]]}."
                elif close:
                    fix = f"did you mean {' or '.join(f'--{where}.{c}' for c in close if c not in known)}?"
                else:
                    fix = f"its fields are {', '.join(sorted(node.keys()))}."
                return f"--{name}.{path}: {where} has no field {key!r}; {fix}"
            node, walked = node[key], [*walked, key]
    return None


def load_module(path: str) -> types.ModuleType:
    """Executes a config file (made importable first) and returns it as a module."""
    make_importable(path)
    name = f"_eflow_config_{os.path.splitext(os.path.basename(path))[0]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"config file {path!r} is not a Python file.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """get_config(arg) of the config file at `path` (the CLI's `--config=path:arg`)."""
    return load_module(path).get_config(arg)


def override(config: ml_collections.ConfigDict, assignment: str) -> None:
    """Applies a bench script's `--set FIELD=VALUE`: 'objective.guidance_scale=1.5',
    'eval.shapes.num_steps=(1,2,4)', 'objective.token_drop=False' (Python literals), or a bare
    string ('objective.mva.weighting=adaptive', 'train.compile_cache_dir=')."""
    key, _, value = assignment.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    try:
        node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        node[leaf] = value


def apply_given(section: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict,
                given: dict[str, Any]) -> ml_collections.ConfigDict:
    """A run's config section with the flags typed on the command line applied over it (in place).

    Args:
      section: the run's section (e.g. config.eval from its config.json); fields it lacks (a snapshot
        older than them) are filled from `defaults` first.
      defaults: the section's defaults (what --eval.* / --sample.* flags start from).
      given: the typed flags only, dotted field -> value (`config_flags.get_override_values`): each
        one wins, whatever its value, also one equal to its default.
    Returns:
      `section`.
    """
    _fill_missing(section, defaults)
    for key, value in given.items():
        *parents, leaf = key.split(".")
        node = section
        for name in parents:
            node = node[name]
        node[leaf] = value
    return section


def _fill_missing(section: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
    for key, value in defaults.items():
        if key not in section:
            with section.unlocked():
                section[key] = value
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(section[key], ml_collections.ConfigDict):
            _fill_missing(section[key], value)
