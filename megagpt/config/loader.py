"""Build a `Config` from defaults, a YAML file and dotted command-line overrides.

Precedence: command line > file > defaults. Every value passes through `_coerce`,
which knows the field's declared type, so a wrong type is caught where it enters and
the error names the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megagpt.config.errors import ConfigError
from megagpt.config.schema import Config
from megagpt.config.validate import validate_config

# Where `--config NAME` looks for NAME.yaml when NAME is not a path.
REPO_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Resolve a config: defaults, then the YAML file at `path`, then `overrides`.

    Args:
        path: A YAML file, or the name of a preset in `configs/` (e.g. "gpt2-124m").
        overrides: "section.key=value" strings, applied last.

    Raises:
        ConfigError: unknown keys, wrong types, or values that do not fit together.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        file = resolve_config_path(path)
        tree = _read_yaml(file)
    given = _merge_overrides(tree, overrides)
    config = config_from_dict(tree, str(path) if path else "defaults", given)
    validate_config(config)
    return config


def apply_overrides(config: Config, overrides: typing.Sequence[str], source: str) -> Config:
    """A new Config: `config` (described by `source` in errors) with "section.key=value"
    overrides applied and validated."""
    tree = config_to_dict(config)
    given = _merge_overrides(tree, overrides)
    config = config_from_dict(tree, source, given)
    validate_config(config)
    return config


def resolve_config_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if candidate.parent == Path("."):  # a bare preset name such as "gpt2-124m"
        name = candidate.name if candidate.suffix in (".yaml", ".yml") else f"{candidate}.yaml"
        for directory in (Path.cwd() / "configs", REPO_CONFIG_DIR):
            if (directory / name).is_file():
                return directory / name
    presets = sorted(p.stem for p in REPO_CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(
        f"config file {str(path)!r} does not exist; give a path to a YAML file or one of "
        f"the presets in {REPO_CONFIG_DIR}: {', '.join(presets)}"
    )


def _read_yaml(file: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{file} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a mapping of sections, not a {type(data).__name__}")
    return data


def _merge_overrides(tree: dict[str, Any], overrides: typing.Sequence[str]) -> set[str]:
    """Set each override in `tree`; return the dotted keys they set."""
    given = set()
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(tree, key, value, source="command line")
        given.add(key)
    return given


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key or "." not in key:
        raise ConfigError(
            f"cannot read override {item!r}: write section.key=value, e.g. optim.lr=3e-4"
        )
    return key.strip(), value.strip()


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key} ({source}): {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def config_from_dict(
    tree: dict[str, Any], source: str = "<dict>", command_line: typing.Collection[str] = ()
) -> Config:
    """Build a Config from a nested dict; missing keys keep their defaults.

    Errors name where a value came from: "command line" for the dotted keys in
    `command_line` (and the sections above them), `source` for the rest.
    """

    def source_of(key: str) -> str:
        given = any(k == key or k.startswith(key + ".") for k in command_line)
        return "command line" if given else source

    return _build(Config, tree, prefix="", source_of=source_of)


def _build(cls: type, data: Any, prefix: str, source_of: typing.Callable[[str], str]) -> Any:
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "config"
        raise ConfigError(
            f"{section} ({source_of(section)}): expected a mapping of keys, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else "."
            raise ConfigError(
                f"unknown key {prefix}{key} ({source_of(f'{prefix}{key}')}){hint} "
                f"Known keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
                f"{', '.join(fields)}"
            )
    values = {}
    for name in fields:
        if name not in data:
            continue
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, data[name], prefix=f"{key}.", source_of=source_of)
        else:
            values[name] = _coerce(data[name], hint, key, source_of(key))
    return cls(**values)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Convert `value` to the declared type `hint`, or raise a ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{key} = {value!r} ({source}): expected {expected}")

    if origin in (Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if value is None:
        fail(_describe(hint))
    if origin is Literal:
        if value in args:
            return value
        fail(f"one of {', '.join(repr(a) for a in args)}")
    if origin is list:
        (item_type,) = args
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else value.split()
        if not isinstance(value, list):
            fail(f"a list of {_describe(item_type)}")
        return [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        fail("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        fail("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        fail("a number")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        fail("a string")
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML that `load_config` reads back unchanged."""
    Path(path).write_text(config_to_yaml(config), encoding="utf-8")
