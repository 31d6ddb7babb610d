"""``ConfigSection``: to_dict/from_dict/replace for frozen config dataclasses, shared by the
generative and text-to-image configs (unknown keys fail with a did-you-mean)."""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

from medmem._errors import InputError
from medmem._io import read_yaml_mapping, resolve_paths
from medmem._validation import check_keys


def deep_merge(base: dict[str, Any], changes: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``base`` with ``changes`` merged in, nested mappings key by key."""
    out = copy.deepcopy(base)
    for k, v in (changes or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class ConfigSection:
    """Shared to_dict/from_dict/replace for the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict; ``from_dict`` gives back an equal config."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if hasattr(v, "to_dict"):  # a nested section (or another config class)
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> Any:
        """Build from a (nested) dict; unknown keys fail with a did-you-mean."""
        where = where or cls.__name__
        if data is None:
            data = {}
        check_keys(data, [f.name for f in fields(cls)], where)  # type: ignore[arg-type]
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            hint = hints[key]
            if isinstance(hint, type) and issubclass(hint, ConfigSection):
                value = hint.from_dict(value, f"{where}.{key}")
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - defensive
            raise InputError(f"{where}: {exc}") from exc

    @classmethod
    def from_yaml(cls, path: str | Path, path_keys: Iterable[tuple[str | None, str]] = ()) -> Any:
        """Read a YAML config; the relative paths under ``path_keys`` ((section, key) pairs)
        are taken relative to the YAML file's folder. Errors name the file."""
        path = Path(path)
        data = read_yaml_mapping(path)
        resolve_paths(data, path_keys, path.resolve().parent)
        try:
            return cls.from_dict(data, "config")
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from exc

    def merge(self, changes: dict[str, Any], where: str | None = None) -> Any:
        """A copy with the nested ``changes`` (a dict shaped like :meth:`to_dict`'s) merged
        in, section by section; unknown keys fail with a did-you-mean naming ``where``.

        Example:
            >>> cfg.merge({"train": {"seed": 1}})  # doctest: +SKIP
        """
        return self.from_dict(deep_merge(self.to_dict(), changes), where)

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied (unknown names fail with a did-you-mean)."""
        check_keys(changes, [f.name for f in fields(self)], type(self).__name__)  # type: ignore[arg-type]
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
