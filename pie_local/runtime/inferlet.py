"""Loading inferlets and parsing their arguments.

An inferlet is a module (a ``.py`` file, a package directory, or a standard-library name from
``pie_local/inferlets/``) that defines::

    NAME = "text-completion"
    DESCRIPTION = "Continue a prompt."
    PARAMETERS = {"prompt": Param(str, required=True, help="text to continue"), ...}
    async def main(rt, args): ...

Arguments come as a dict or as a ``--key value`` list (``--flag`` alone sets a bool parameter,
``--no-flag`` clears it) and are checked against PARAMETERS with clear errors.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

_MISSING = object()


class InferletError(ValueError):
    """An inferlet could not be found or loaded, or its arguments are wrong."""


@dataclass(frozen=True)
class Param:
    type: type = str
    required: bool = False
    default: Any = None
    help: str = ""
    choices: Sequence[Any] | None = None

    def convert(self, name: str, value: Any) -> Any:
        if self.type is bool and isinstance(value, str):
            lowered = value.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise InferletError(f"--{name} expects true/false, got {value!r}")
            value = lowered in ("1", "true", "yes", "on")
        elif self.type in (list, dict) and isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except ValueError as exc:
                raise InferletError(f"--{name} expects JSON ({self.type.__name__}), got {value!r}") from exc
        elif not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            try:
                value = self.type(value)
            except (TypeError, ValueError):
                raise InferletError(f"--{name} expects {self.type.__name__}, got {value!r}") from None
        if not isinstance(value, self.type):
            raise InferletError(f"--{name} expects {self.type.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise InferletError(f"--{name} must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        return value


class Args(dict):
    """Parsed arguments: ``args["prompt"]`` or ``args.prompt``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no argument {name!r}") from None


@dataclass
class InferletSpec:
    name: str
    description: str
    parameters: dict[str, Param]
    main: Callable[..., Any]
    source: str  # where it came from (file path, module name or "<function>")

    def parse_args(self, args: dict | Sequence[str] | None) -> Args:
        return parse_args(self.parameters, args, self.name)

    def usage(self) -> str:
        lines = [f"{self.name}: {self.description}".rstrip(": ")]
        for key, p in self.parameters.items():
            flag = f"--{key.replace('_', '-')}" + ("" if p.type is bool else f" {p.type.__name__.upper()}")
            extra = " (required)" if p.required else ("" if p.default is None else f" (default {p.default!r})")
            lines.append(f"  {flag:<28} {p.help}{extra}")
        return "\n".join(lines)


def parse_args(parameters: dict[str, Param], args: dict | Sequence[str] | None, name: str = "inferlet") -> Args:
    given: dict[str, Any] = {}
    if args is None:
        pass
    elif isinstance(args, dict):
        given = {str(k).replace("-", "_"): v for k, v in args.items()}
    else:
        given = _parse_list(parameters, list(args), name)
    unknown = sorted(set(given) - set(parameters))
    if unknown:
        known = ", ".join(f"--{k.replace('_', '-')}" for k in parameters) or "none"
        raise InferletError(f"{name}: unknown argument --{unknown[0].replace('_', '-')} (parameters: {known})")
    out = Args()
    for key, param in parameters.items():
        if key in given and given[key] is not None:
            out[key] = param.convert(key.replace("_", "-"), given[key])
        elif param.required:
            flag = key.replace("_", "-")
            raise InferletError(f"{name}: missing required argument --{flag} ({param.help or param.type.__name__})")
        else:
            out[key] = param.default
    return out


def _parse_list(parameters: dict[str, Param], argv: list[str], name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        item = argv[i]
        if not item.startswith("--") or item == "--":
            raise InferletError(f"{name}: expected --key value, got {item!r}")
        key, eq, value = item[2:].partition("=")
        key = key.replace("-", "_")
        param = parameters.get(key)
        negated = parameters.get(key[3:]) if key.startswith("no_") else None
        if param is None and not eq and negated is not None and negated.type is bool:
            out[key[3:]] = False
            i += 1
            continue
        if not eq:
            if param is not None and param.type is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                out[key] = True
                i += 1
                continue
            if i + 1 == len(argv):
                raise InferletError(f"{name}: --{key.replace('_', '-')} needs a value")
            value = argv[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out


def load_inferlet(target: str | os.PathLike | Callable[..., Any]) -> InferletSpec:
    """A standard-library name, a path to a .py file or package directory, or an async function."""
    if callable(target) and not isinstance(target, (str, os.PathLike)):
        if not inspect.iscoroutinefunction(target):
            raise InferletError(f"{getattr(target, '__name__', target)!r} is not an async function")
        return InferletSpec(getattr(target, "__name__", "inferlet"), (target.__doc__ or "").strip().split("\n")[0],
                            dict(getattr(target, "PARAMETERS", {})), target, "<function>")
    text = os.fspath(target)
    path = Path(text).expanduser()
    looks_like_path = path.suffix == ".py" or os.sep in text or (os.altsep is not None and os.altsep in text)
    module_name = "pie_local.inferlets." + text.replace("-", "_")
    if not looks_like_path and _module_exists(module_name):
        module, source = importlib.import_module(module_name), module_name  # a stdlib name wins
    elif looks_like_path or path.exists():
        module, source = _load_path(path), str(path)
    else:
        raise InferletError(f"no inferlet named {text!r} (standard ones: {', '.join(stdlib_names()) or 'none'}; "
                            "or give a path to a .py file)")
    return _spec_from_module(module, source)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # e.g. a dotted name whose parent is not a package
        return False


def stdlib_names() -> list[str]:
    import pie_local.inferlets as pkg

    root = Path(pkg.__file__).parent
    names = [p.stem for p in root.glob("*.py") if not p.stem.startswith("_")]
    names += [p.name for p in root.iterdir()
              if p.is_dir() and (p / "__init__.py").exists() and not p.name.startswith("_")]
    return sorted(n.replace("_", "-") for n in names)


def _load_path(path: Path) -> ModuleType:
    if path.is_dir():
        path = path / "__init__.py"
    if not path.is_file():
        raise InferletError(f"inferlet file not found: {path}")
    name = f"pie_inferlet_{abs(hash(str(path.resolve())))}"
    package_dirs = [str(path.parent)] if path.name == "__init__.py" else None  # relative imports work
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=package_dirs)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise InferletError(f"cannot load inferlet {path}: {type(exc).__name__}: {exc}") from exc
    return module


def _spec_from_module(module: ModuleType, source: str) -> InferletSpec:
    main = getattr(module, "main", None)
    if main is None or not inspect.iscoroutinefunction(main):
        raise InferletError(f"inferlet {source} has no `async def main(rt, args)`")
    params = getattr(module, "PARAMETERS", {}) or {}
    for key, p in params.items():
        if not isinstance(p, Param):
            raise InferletError(f"inferlet {source}: PARAMETERS[{key!r}] must be a Param")
    default_name = Path(source).stem if source.endswith(".py") else source.rsplit(".", 1)[-1].replace("_", "-")
    return InferletSpec(getattr(module, "NAME", default_name), getattr(module, "DESCRIPTION", ""), dict(params),
                        main, source)
