"""A griffe extension for the API reference: pgsim's docstrings use Sphinx roles (:func:`pgsim.search`),
which Markdown would print as they are. Each role becomes a link when its target is an object the
reference page documents (the public API), and inline code otherwise (a private helper, say).

Configured in mkdocs.yml (mkdocstrings' ``extensions`` option); it changes what is rendered, not pgsim.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|exc|data|obj|const):`(~?)([^`<>]+)`")
# The packages whose exported names the reference page renders (docs/reference.md).
PUBLIC = ("pgsim", "pgsim.sqlalchemy", "pgsim.alembic")


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.path != "pgsim":
            return
        public = _public_paths(pkg)
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(lambda match: _render(match, obj, pkg, public), obj.docstring.value)


def _walk(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)  # type: ignore[arg-type]


def _public_paths(pkg: griffe.Module) -> dict[str, str]:
    """Canonical path -> the path the reference page shows it under, for every rendered object."""
    shown: dict[str, str] = {}
    for package_path in PUBLIC:
        try:
            package = pkg.modules_collection[package_path]
        except KeyError:
            continue
        shown[package.path] = package.path
        for name in package.exports or ():
            try:
                target = package.members[name].final_target if package.members[name].is_alias else package.members[name]
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
            public_path = f"{package_path}.{name}"
            shown.setdefault(target.path, public_path)
            for member_name, member in target.members.items():
                if not member_name.startswith("_") and not member.is_alias:
                    shown.setdefault(member.path, f"{public_path}.{member_name}")
    return shown


def _render(match: re.Match[str], obj: griffe.Object, pkg: griffe.Module, public: dict[str, str]) -> str:
    short, target = match.group(1) == "~", match.group(2).strip()
    shown = target.split(".")[-1] if short else target
    for candidate in _candidates(target, obj):
        try:
            found = pkg.modules_collection[candidate]
            path = found.final_target.path if found.is_alias else found.path
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue  # not there, or an alias into another package (psycopg.types.TypeInfo, say)
        if path in public:
            return f"[`{shown}`][{public[path]}]"
    return f"`{shown}`"


def _candidates(target: str, obj: griffe.Object) -> list[str]:
    """Where a role's target may live: as written, or relative to the object, its class or its module."""
    places = [target]
    for scope in (obj, obj.parent, obj.module):
        if scope is not None:
            places.append(f"{scope.path}.{target}")
    return places
