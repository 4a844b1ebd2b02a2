"""Griffe extension used by the docs build (mkdocs.yml loads it; the library does not).

The library's docstrings follow the project style (Google sections, a singular
``Example:`` section, Sphinx roles such as ``:func:`sigreg```, ``::`` before literal
blocks). mkdocstrings renders Markdown, so before a docstring is parsed this extension:

* reads ``Example:`` as griffe's ``Examples:`` section (otherwise it becomes an
  admonition and the ``>>>`` lines turn into nested block quotes);
* turns ``:func:`name```, ``:class:`~a.b.Name```, ``:meth:``, ``:mod:``, ``:attr:``
  into a cross-reference when the name resolves to a documented object of jepa_blocks,
  and into plain inline code otherwise;
* turns a paragraph's closing ``::`` into ``:``.

Nothing in ``src/`` changes; the docstrings stay valid reStructuredText-flavoured
Google style for ``help()`` and IDEs.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|obj|data|exc):`(~?)([\w.]+)`")
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)


def _documented_path(obj: griffe.Object, name: str) -> str | None:
    """Canonical path of ``name`` seen from ``obj`` if the docs render it, else None."""
    head, _, rest = name.partition(".")
    try:
        if name.startswith("jepa_blocks"):
            path = name
        else:
            path = obj.resolve(head) + (f".{rest}" if rest else "")
        target = obj.modules_collection[path]
        if target.is_alias:
            target = target.final_target
    except Exception:  # noqa: BLE001 - anything unresolvable is rendered as code
        return None
    path = target.path
    if not path.startswith("jepa_blocks.") or any(part.startswith("_") for part in path.split(".")):
        return None
    module = target if target.is_module else target.module
    if module.is_init_module or (not target.is_module and not target.is_public):
        return None  # subpackage __init__ pages are not rendered; private names neither
    return path


class DocstringStyle(griffe.Extension):
    """Adapt the project's docstring conventions to mkdocstrings' Markdown rendering."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self.on_object(obj=pkg)  # the top package gets no on_object event

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
        text = _LITERAL.sub(r"\1:", text)

        def role(match: re.Match[str]) -> str:
            tilde, name = match.groups()
            shown = name.rsplit(".", 1)[-1] if tilde else name
            path = _documented_path(obj, name)
            return f"[`{shown}`][{path}]" if path else f"`{shown}`"

        obj.docstring.value = _ROLE.sub(role, text)
