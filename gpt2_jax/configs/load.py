"""`--config NAME|FILE[:ARG]` -> the config's locked ConfigDict, or one error line that says what to fix.

NAME is a packaged preset (gpt2_jax/configs/NAME.py), found from any directory and after a
non-editable install; `configs/NAME.py` that does not exist here (another directory) means the
same preset, since the checkout's file only re-exports it; anything else is a file of yours.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import re
import traceback

import ml_collections

from gpt2_jax.configs import PRESETS, aliases
from gpt2_jax.configs.keys import DEFAULTS
from gpt2_jax.errors import UserError

# ml_collections' error for a key set on a locked config carries the key only in its text (and
# dumps the whole config after it); if the text changes, the error still shows, without the hint.
LOCKED = re.compile(r"""Key "([^"]+)" does not exist and cannot be added since the config is locked""")


class ConfigFileError(UserError, ValueError):
    """A config that cannot be found or run, or that sets a key the trainer does not have."""


def split(spec: str) -> tuple[str, str | None]:
    """'configs/x.py:a=1' -> ('configs/x.py', 'a=1'); no ':' -> (target, None), as ml_collections."""
    target, colon, arg = spec.partition(":")
    return target, (arg if colon else None)


def resolve(target: str) -> tuple[str, str]:
    """('file', path) or ('preset', name) for a --config target."""
    if os.path.isfile(target):
        return "file", target
    name = target.removeprefix("configs/").removesuffix(".py")  # configs/NAME.py from another directory
    if name in PRESETS:
        return "preset", name
    close = difflib.get_close_matches(os.path.basename(name), PRESETS, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigFileError(f"config {target} is neither a file nor a packaged config ({', '.join(PRESETS)}){hint}")


def load(spec: str) -> ml_collections.ConfigDict:
    """Run the config's get_config([arg]) and check its keys against the trainer's."""
    target, arg = split(spec)
    kind, where = resolve(target)
    try:
        module = importlib.import_module(f"gpt2_jax.configs.{where}") if kind == "preset" else _exec_file(where)
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            raise ConfigFileError(f"config {target} defines no get_config(arg) function")
        config = get_config() if arg is None else get_config(arg)
    except ConfigFileError:
        raise
    except Exception as e:  # whatever the file raised: one line naming the file and its line
        raise ConfigFileError(_explain(e, target, os.path.abspath(where) if kind == "file" else "")) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigFileError(f"config {target}: get_config returned a {type(config).__name__}, not a ConfigDict; "
                              "start from `from gpt2_jax.configs import common; c = common.base_config()`")
    _check_keys(config, target)
    config.lock()
    return config


def _exec_file(path: str):
    name = "gpt2_jax_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigFileError(f"config {path} is not a Python file (give a .py file or a packaged config name)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _explain(e: BaseException, target: str, path: str) -> str:
    """`config FILE, line N: what happened; how to fix it` for an exception from the config file
    (the line only for a file of yours: a packaged preset fails on its argument, not its code)."""
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == path]
    if isinstance(e, SyntaxError) and e.lineno:
        lines = [e.lineno]
    where = f"config {target}" + (f", line {lines[-1]}" if lines else "")
    if isinstance(e, ModuleNotFoundError) and e.name == "common":
        return (f"{where}: No module named 'common'; the shared pieces are part of the package: "
                "`from gpt2_jax.configs import common`")  # fmt: skip
    locked = LOCKED.search(str(e))
    if isinstance(e, AttributeError) and locked:
        key = locked.group(1)
        return f"{where}: unknown config key {key!r}{aliases.key_hint(key, DEFAULTS)}"
    text = (str(e).strip().splitlines() or [""])[0] if not isinstance(e, SyntaxError) else e.msg
    return f"{where}: {text or type(e).__name__}"


def flat_keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted leaf keys: 'model.n_layer', 'lr', ..."""
    keys = []
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            keys += flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(prefix + k)
    return keys


def _check_keys(config: ml_collections.ConfigDict, target: str) -> None:
    """A config built without base_config() (or that unlocked it) must still hold exactly the
    trainer's keys: an extra one is a misspelling nobody reads, a missing one fails mid-run."""
    keys = set(flat_keys(config))
    extra = sorted(keys - set(DEFAULTS))
    if extra:
        raise ConfigFileError(f"config {target}: unknown config key {extra[0]!r}{aliases.key_hint(extra[0], DEFAULTS)}")
    missing = sorted(set(DEFAULTS) - keys)
    if missing:
        raise ConfigFileError(f"config {target} lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                              "start from `from gpt2_jax.configs import common; c = common.base_config()`")
