"""From a name or path and ``--set`` overrides to a validated, resolved ``Config``: YAML
reading, override application, error messages naming the key path, path resolution."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kiln.config.fields import FilePath, type_parts
from kiln.config.schema import JOB_SECTIONS, UNREAD_SECTIONS, Config
from kiln.errors import ConfigError

PACKAGED_CONFIGS = "kiln.configs"
DEFAULT_CONFIG_NAME = "default"


def packaged_config_names() -> list[str]:
    """Names accepted by ``--config NAME``."""
    folder = resources.files(PACKAGED_CONFIGS)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_config_source(name_or_path: str | None) -> tuple[dict[str, Any], str]:
    """Load the raw mapping of a packaged config name or a YAML file; return it and its origin."""
    name = name_or_path or DEFAULT_CONFIG_NAME
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in name or path.exists():
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; pass a YAML file inside it")
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist; pass a YAML file or one of the packaged "
                f"names: {', '.join(packaged_config_names())}"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:  # e.g. saved as UTF-16 by an editor
            raise ConfigError(
                f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                "save it as UTF-8"
            ) from None
        return _parse_yaml(text, str(path)), str(path)
    if name not in packaged_config_names():
        raise ConfigError(
            f"unknown config {name!r}: not a file and not a packaged config "
            f"(packaged: {', '.join(packaged_config_names())})"
        )
    text = resources.files(PACKAGED_CONFIGS).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return _parse_yaml(text, f"packaged config {name!r}"), f"packaged:{name}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last one silently, so a second `model:` section would replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


# PyYAML follows YAML 1.1, where a float needs a dot: `1e-4` would be the string "1e-4", which a
# strict field then refuses. Read exponent floats as YAML 1.2 does, in files and overrides alike.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{origin} must be a mapping of sections (seed, model, data, ...), "
            f"got {type(raw).__name__}"
        )
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML scalars or lists."""
    result = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.path=value")
        parts = key.strip().split(".")
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
        _check_known_path(parts, item)
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return result


def _check_known_path(parts: list[str], item: str) -> None:
    """Reject an override whose key path the schema does not have, naming the valid keys."""
    model: type[BaseModel] | None = Config
    for depth, part in enumerate(parts):
        if model is None:
            break
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(
                f"override {item!r}: unknown key {'.'.join(parts[: depth + 1])!r}; "
                f"valid keys at {where}: {', '.join(fields)}"
            )
        annotation = fields[part].annotation
        section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        mapping = annotation is dict or typing.get_origin(annotation) is dict  # free-form keys
        if depth + 1 < len(parts) and not (section or mapping):
            key = ".".join(parts[: depth + 1])
            if any(p is list for p in type_parts(annotation)):
                raise ConfigError(
                    f"override {item!r}: {key} is a list; an override sets it whole, e.g. "
                    f"--set '{key}=[...]' (YAML flow style)"
                )
            raise ConfigError(f"override {item!r}: {key} is a single value, it has no keys")
        model = annotation if section else None


def validate_config(raw: dict[str, Any]) -> Config:
    """Validate a raw mapping into a Config, turning pydantic errors into one clear ConfigError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: key path, bad value, what is expected."""
    lines = [f"invalid config ({exc.error_count()} problem{'s' * (exc.error_count() > 1)}):"]
    for err in exc.errors():
        path = _key_path(err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(
                f"  {path}: unknown key (value {err['input']!r}); remove it or fix its spelling"
            )
            continue
        if isinstance(err["input"], dict):  # a whole section failed a cross-field check
            message = _expected(err)
            # a whole-config check, or one that already names the key path, speaks for itself
            named = not err["loc"] or message.startswith(f"{path}.")
            lines.append(f"  {message}" if named else f"  {path}: {message}")
            continue
        lines.append(f"  {path}: got {err['input']!r}; expected {_expected(err)}")
    return "\n".join(lines)


def _key_path(loc: tuple[int | str, ...]) -> str:
    """``('data', 'sources', 0, 'root')`` -> ``data.sources[0].root``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f"{'.' if path else ''}{part}"
    return path


def _expected(err: Any) -> str:
    msg: str = err["msg"]
    for prefix in ("Input should be ", "Value error, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config; the one way the CLI turns input into a Config."""
    raw, _ = read_config_source(name_or_path)
    config = validate_config(apply_overrides(raw, overrides or []))
    _refuse_unread_settings(config)
    return config


def _refuse_unread_settings(config: Config) -> None:
    """A ConfigError naming every setting, changed from its default, that the job never reads.

    Checked on what the user gave, not on run snapshots: resolving a config rewrites paths in
    sections the job ignores, and an old run must stay resumable.
    """
    unread = [
        f"{name}.{key}"
        for name in UNREAD_SECTIONS[config.job]
        for key in _changed_keys(
            getattr(config, name).model_dump(), type(getattr(config, name))().model_dump()
        )
    ]
    if unread:
        own = f" ({config.job}'s own settings are under {config.job}.*)" * (
            config.job in JOB_SECTIONS
        )
        raise ConfigError(
            f"job {config.job} does not read {', '.join(unread)}: a value set there changes "
            f"nothing; remove it, or set `job` to the job that reads it{own}"
        )


def _changed_keys(values: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose value differs from the default, nested sections followed."""
    changed = []
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict) and value and default:
            changed += _changed_keys(value, default, f"{prefix}{key}.")
        elif value != default:
            changed.append(f"{prefix}{key}")
    return changed


def resolve_config(config: Config) -> Config:
    """Pin what 'auto' and the current folder leave open, so the snapshot records it: the thread
    count, the device, and every relative file path (made absolute)."""
    resolved = config.model_copy(deep=True)
    for setting in path_settings(resolved):
        setting.set(_absolute(setting.value))
    if resolved.hardware.threads == "auto":
        # torchrun's workers on this machine (LOCAL_WORLD_SIZE) share its CPUs: threads beyond
        # their share oversubscribe the cores and slow every rank down.
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        resolved.hardware.threads = max(1, (os.cpu_count() or 1) // ranks_here)
    if resolved.hardware.device == "auto":
        import torch

        resolved.hardware.device = "cuda" if torch.cuda.is_available() else "cpu"
    return resolved


def _absolute(path: str) -> str:
    """``path`` made absolute against the current folder; a ``~`` path is left as written."""
    return path if os.path.isabs(os.path.expanduser(path)) else os.path.abspath(path)


@dataclasses.dataclass(frozen=True)
class PathSetting:
    """One file-system path a config names: its key path, its value, and how to change it."""

    key: str
    value: str
    set: typing.Callable[[str], None]


def path_settings(config: Config) -> list[PathSetting]:
    """Every path the config names: ``FilePath`` fields holding a path (not a packaged name, not
    null) in the sections the job reads, and the hashtron task's ``path``/``root`` options.

    The sections a job never reads keep their defaults, so its snapshot (an export's
    config.yaml) loads again with ``load_config``."""
    found: list[PathSetting] = []
    _collect_paths(config, "", set(UNREAD_SECTIONS[config.job]), found)
    options = config.hashtron.task.options
    if config.job == "hashtron":
        for key in ("path", "root"):  # the csv/jsonl file and the MNIST folder
            if isinstance(options.get(key), str):
                found.append(PathSetting(f"hashtron.task.options.{key}", options[key],
                                         lambda v, k=key: options.__setitem__(k, v)))
    return found


def _collect_paths(
    section: BaseModel, prefix: str, skip: set[str], found: list[PathSetting]
) -> None:
    for name, field in type(section).model_fields.items():
        if name in skip:
            continue
        value, key = getattr(section, name), f"{prefix}{name}"
        # pydantic keeps a plain Annotated field's marks in field.metadata, a union's in its type
        marks = [
            m for m in (*field.metadata, *type_parts(field.annotation)) if isinstance(m, FilePath)
        ]
        if marks and isinstance(value, str) and value not in marks[0].keywords:
            found.append(PathSetting(key, value, lambda v, o=section, n=name: setattr(o, n, v)))
        children = value if isinstance(value, list) else [value]
        for index, child in enumerate(children):
            if isinstance(child, BaseModel):
                where = f"{key}[{index}]." if isinstance(value, list) else f"{key}."
                _collect_paths(child, where, set(), found)
