"""HTML pages from the template files shipped in ``medmem/_assets`` (Jinja2).

Autoescape is on: every value put into a template is HTML-escaped unless it is marked
:func:`trusted` (markup built by medmem's own escaping helpers) or is a CSS/JS
:func:`asset` (files of the package, never data).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent / "_assets"


@lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )


def render(name: str, **values: Any) -> str:
    """The template ``name`` filled with ``values`` (escaped unless trusted)."""
    return _environment().get_template(name).render(**values)


def trusted(markup: str) -> Any:
    """``markup`` inserted as is: only for HTML medmem built with escaped values."""
    from markupsafe import Markup

    return Markup(markup)  # noqa: S704


@lru_cache(maxsize=8)
def asset(name: str) -> Any:
    """A CSS or JS file of the package, inserted as is."""
    return trusted((TEMPLATES / name).read_text(encoding="utf-8"))


__all__ = ["TEMPLATES", "asset", "render", "trusted"]
