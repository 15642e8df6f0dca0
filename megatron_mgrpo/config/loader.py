"""Load the config tree from YAML plus dotted command-line overrides, strictly.

    cfg = load_config("examples/tiny.yaml", ["--algorithm.momentum", "0.995",
                                             "--model.num_layers=4"])

Precedence: override > file > dataclass default. Every problem is one `ConfigError` line naming
the key and what it accepts: unknown keys (with a did-you-mean), values of the wrong type
(checked against the field annotations), a section given a scalar, a file that is missing, not
YAML, or not a mapping. Then `Config.validate()` checks the cross-field constraints.

YAML is read with the YAML 1.2 core schema rather than PyYAML's 1.1 default: `1e-5` is a number,
`yes`/`on` and dates stay strings, `010` is ten, and only `true`/`false` are booleans.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from megatron_mgrpo.config.schema import Config, ConfigError

__all__ = ["load_config", "config_to_dict", "dump_config", "field_docs"]

_MISSING = object()


# --------------------------------------------------------------------------------------------
# YAML 1.2 core schema for PyYAML.

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$")
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
                        |[-+]?\.(?:inf|Inf|INF)
                        |\.(?:nan|NaN|NAN))$""", re.X)
_MERGE = re.compile(r"^(?:<<)$")


def _core_resolvers() -> Dict[Any, list]:
    table: Dict[Any, list] = {}

    def add(tag: str, regexp: re.Pattern, first: str) -> None:
        for ch in first:
            table.setdefault(ch, []).append((tag, regexp))

    add("tag:yaml.org,2002:null", _NULL, "~nN")
    table.setdefault("", []).append(("tag:yaml.org,2002:null", _NULL))
    add("tag:yaml.org,2002:bool", _BOOL, "tTfF")
    add("tag:yaml.org,2002:int", _INT, "-+0123456789")  # before float: "10" is an int
    add("tag:yaml.org,2002:float", _FLOAT, "-+0123456789.")
    add("tag:yaml.org,2002:merge", _MERGE, "<")
    return table


class _Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema and duplicate keys refused."""

    yaml_implicit_resolvers = _core_resolvers()

    def construct_yaml_int(self, node: yaml.Node) -> int:
        text = self.construct_scalar(node).replace("_", "")
        if text.startswith("0x"):
            return int(text[2:], 16)
        if text.startswith("0o"):
            return int(text[2:], 8)
        return int(text, 10)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != \
                        "tag:yaml.org,2002:merge":
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key_node.value!r}",
                            key_node.start_mark)
                    seen[key_node.value] = key_node
        return super().construct_mapping(node, deep=deep)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _both_resolvers() -> Dict[Any, list]:
    """YAML 1.1's implicit resolvers followed by 1.2's, per first character."""
    core, old = _core_resolvers(), yaml.SafeDumper.yaml_implicit_resolvers
    return {ch: list(old.get(ch, [])) + core.get(ch, []) for ch in set(old) | set(core)}


class _Dumper(yaml.SafeDumper):
    """Quotes every string that either YAML 1.1 or 1.2 would read as something else."""

    yaml_implicit_resolvers = _both_resolvers()


def _yaml_error(where: str, e: yaml.YAMLError) -> ConfigError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = "; ".join(str(s) for s in (getattr(e, "context", None), getattr(e, "problem", None))
                    if s) or str(e).splitlines()[0]
    return ConfigError(f"{where}: YAML error{at}: {what}")


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} "
                          f"at line {line}); save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise _yaml_error(f"config file {path}", e) from None


# --------------------------------------------------------------------------------------------
# Types: what a field accepts, and checking a value against it.

@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    """Field name -> resolved annotation, for the fields settable through __init__."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _section_class(tp: Any) -> Optional[type]:
    """The dataclass behind `tp` (also through Optional), else None."""
    if _is_union(tp):
        classes = [a for a in typing.get_args(tp) if a is not type(None)]
        return _section_class(classes[0]) if len(classes) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _is_mapping_type(tp: Any) -> bool:
    """Whether `tp` (also through Optional) is a free-form mapping (Dict[...] or Any)."""
    if _is_union(tp):
        return any(_is_mapping_type(a) for a in typing.get_args(tp) if a is not type(None))
    return tp is Any or tp is dict or typing.get_origin(tp) is dict


def _mapping_value_type(tp: Any) -> Any:
    if _is_union(tp):
        for a in typing.get_args(tp):
            if a is not type(None) and _is_mapping_type(a):
                return _mapping_value_type(a)
    args = typing.get_args(tp)
    return args[1] if len(args) == 2 else Any


def _describe(tp: Any) -> str:
    """What a field of type `tp` accepts, in words."""
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (list, tuple) or tp in (list, tuple):
        if args and args[-1] is not Ellipsis and origin is tuple:
            return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
        return f"a list (items: {_describe(args[0])})" if args else "a list"
    if origin is dict or tp is dict:
        return (f"a mapping (values: {_describe(args[1])})" if len(args) == 2 and args[1] is not Any
                else "a mapping")
    if _section_class(tp) is not None:
        return f"a mapping of {tp.__name__} keys ({', '.join(_hints(tp))})"
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


class _Mismatch(ConfigError):
    """The value at `path` itself is of the wrong kind (as opposed to something inside it)."""

    def __init__(self, path: str, value: Any, accepted: str):
        shown = repr(value) if not isinstance(value, (dict, list)) else _kind(value)
        kind = "" if value is None or isinstance(value, (dict, list)) else f" ({_kind(value)})"
        super().__init__(f"{path}: got {shown}{kind}; accepted: {accepted}")
        self.path = path


def _convert(tp: Any, value: Any, path: str, root: type) -> Any:
    """`value` checked against annotation `tp` (ints widened to float where a float is due)."""
    if tp is Any or tp is object:
        return copy.deepcopy(value)
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, root)
            except _Mismatch as e:
                if e.path != path:
                    raise
        raise _Mismatch(path, value, _describe(tp))
    section = _section_class(tp)
    if section is not None:
        return _build(section, value, path, root)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch(path, value, _describe(tp))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch(path, value, _describe(tp))
        key_tp, value_tp = args if len(args) == 2 else (Any, Any)
        out = {}
        for k, v in value.items():
            _convert(key_tp, k, f"{path} (key {k!r})", root)
            out[k] = _convert(value_tp, v, f"{path}.{k}", root)
        return out
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(path, value, _describe(tp))
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch(path, value, _describe(tp))
            items = [_convert(a, v, f"{path}[{i}]", root)
                     for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{path}[{i}]", root) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return value  # an annotation this loader does not know: take the value as given
    raise _Mismatch(path, value, _describe(tp))


def _unknown_key(cls: type, prefix: str, key: Any, root: type) -> ConfigError:
    """'unknown config key ...' with the closest accepted key, or the section's list."""
    names = list(_hints(cls))
    full = f"{prefix}.{key}" if prefix else str(key)
    where = f"'{prefix}'" if prefix else "the top level"
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
    else:
        elsewhere = [p for p in _leaf_paths(root) if p.rsplit(".", 1)[-1] == str(key)]
        if elsewhere:
            hint = f"did you mean '{elsewhere[0]}'?"
        else:
            hint = f"accepted keys in {where}: {', '.join(names)}"
    return ConfigError(f"unknown config key '{full}'; {hint}")


def _leaf_paths(cls: type, prefix: str = "") -> List[str]:
    out = []
    for name, tp in _hints(cls).items():
        path = f"{prefix}{name}"
        sub = _section_class(tp)
        out.extend(_leaf_paths(sub, path + ".") if sub is not None else [path])
    return out


def _build(cls: type, value: Any, path: str, root: type) -> Any:
    """An instance of dataclass `cls` from a mapping, every key and value checked."""
    if value is None:
        value = {}  # an empty section (`model:` with everything commented out)
    if not isinstance(value, dict):
        raise _Mismatch(path or "config", value, _describe(cls))
    hints = _hints(cls)
    kwargs = {}
    for key, item in value.items():
        if not isinstance(key, str) or key not in hints:
            raise _unknown_key(cls, path, key, root)
        kwargs[key] = _convert(hints[key], item, f"{path}.{key}" if path else key, root)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Overrides.

def _parse_overrides(overrides: Sequence[str]) -> List[Tuple[str, str, str]]:
    """`--a.b v` / `--a.b=v` -> [(key, raw value, the flag as written)]."""
    out, args, i = [], list(overrides), 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--") or len(flag) == 2:
            raise ConfigError(f"override {flag!r}: expected --section.key VALUE or "
                              "--section.key=VALUE")
        key, eq, text = flag[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override {flag}: no value given (write null for None)")
            text, i = args[i + 1], i + 1
        elif text == "":
            raise ConfigError(f"override {flag}: no value given (write null for None)")
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {flag}: malformed key {key!r}")
        out.append((key, text, flag))
        i += 1
    return out


def _parse_value(text: str, flag: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise _yaml_error(f"override {flag}", e) from None


def _field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return copy.deepcopy(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def _apply_override(raw: dict, root: type, key: str, value: Any) -> None:
    """Set the dotted `key` in the raw tree, walking the dataclass tree to check each part."""
    parts = key.split(".")
    node, tp, cls = raw, root, root  # node: raw mapping at this level; tp: its annotation
    for depth, part in enumerate(parts):
        done = ".".join(parts[:depth + 1])
        last = depth == len(parts) - 1
        cls = _section_class(tp)
        if cls is not None:
            hints = _hints(cls)
            if part not in hints:
                raise _unknown_key(cls, ".".join(parts[:depth]), part, root)
            child_tp = hints[part]
        else:  # inside a free-form mapping (like model.rope_scaling)
            child_tp = _mapping_value_type(tp)
        if last:
            if _section_class(child_tp) is not None and isinstance(value, dict) and \
                    isinstance(node.get(part), dict):
                node[part] = _merged(node[part], value)  # --model '{num_layers: 4}' merges
            else:
                node[part] = value
            return
        if _section_class(child_tp) is None and not _is_mapping_type(child_tp):
            raise ConfigError(f"override --{key}: '{done}' is a single value "
                              f"({_describe(child_tp)}), not a section with keys")
        child = node.get(part, _MISSING)
        if child is _MISSING or child is None:
            default = _field_default(cls, part) if cls is not None else _MISSING
            child = default if isinstance(default, dict) else {}
            node[part] = child
        elif not isinstance(child, dict):
            raise ConfigError(f"override --{key}: '{done}' holds {child!r}, not a mapping")
        node, tp = child, child_tp


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


# --------------------------------------------------------------------------------------------
# Public API.

def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), cls: type = Config,
                validate: bool = True, world_size: Optional[int] = None) -> Any:
    """Config from a YAML file (optional), dotted overrides, and the dataclass defaults.

    `overrides` are command-line tokens: `--section.key VALUE` or `--section.key=VALUE`, values
    read as YAML (`null`, `true`, `1e-5`, `[1, 2]`); keys inside a mapping field
    (`--model.rope_scaling.factor 8`) work too. With `validate`, `cls.resolve(written keys)`
    (the effective model: the base's architecture where model.load names one) and
    `cls.validate(world_size)` run last. Every problem raises one `ConfigError` line naming
    the key.
    """
    raw: Any = {}
    if path is not None:
        raw = _read_yaml(str(path))
        if raw is None:
            raw = {}  # an empty file: all defaults
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections "
                              f"({', '.join(_hints(cls))}); got {_kind(raw)}")
    raw = copy.deepcopy(raw)
    for key, text, flag in _parse_overrides(overrides):
        _apply_override(raw, cls, key, _parse_value(text, flag))
    cfg = _build(cls, raw, "", cls)
    if validate and hasattr(cfg, "resolve"):
        # The keys written per section (file and overrides): fields a base model sets must
        # agree with it where they are written.
        cfg = cfg.resolve({k: set(v) for k, v in raw.items() if isinstance(v, dict)})
    if validate and hasattr(cfg, "validate"):
        cfg.validate(world_size)
    return cfg


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """The config tree as plain nested dicts/lists/scalars (field order kept)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict wants a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name))
                for f in dataclasses.fields(value) if f.init}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_config(cfg: Any) -> str:
    """The config as YAML that `load_config` reads back to an equal config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False, allow_unicode=True, width=100)


@functools.lru_cache(maxsize=None)
def _own_field_docs(cls: type) -> Dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
                isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and \
                isinstance(after.value.value, str):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_docs(cls: type) -> Dict[str, str]:
    """Field name -> the docstring written under the field ('' where there is none)."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}
