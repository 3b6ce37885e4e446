"""Finding agent types: entry points, ``module:Class`` specs, validation.

Sources, in order: the entry-point group ``phoenix_node.agents`` (each entry
point names an Agent subclass; Phoenix's own demo agents come this way), then
``module:Class`` specs from the command line or config file. Every class is
validated with :func:`validate_agent_class`; an import error, a bad class or
two plugins claiming one type name stop the load with a :class:`PluginError`
that names the plugin. Loading happens in the supervisor before any worker is
forked, so a broken plugin never produces a half-started node.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from importlib.metadata import entry_points

from ._errors import PluginError
from .agent import Agent, validate_agent_class

__all__ = ["ENTRY_POINT_GROUP", "load_agent_types", "load_spec"]

ENTRY_POINT_GROUP = "phoenix_node.agents"


def load_spec(spec: str) -> type[Agent]:
    """Import ``module:Class`` (the class may be dotted) and validate it."""
    module_name, colon, qualname = spec.partition(":")
    if not colon or not module_name or not qualname:
        raise PluginError(f"plugin {spec!r}: expected the form module:Class")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:
        raise PluginError(f"plugin {spec}: import failed: {type(exc).__name__}: {exc}") from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"plugin {spec}: module {module_name} has no {qualname}") from None
    return validate_agent_class(obj, spec)


def load_agent_types(
    specs: Iterable[str] = (), *, use_entry_points: bool = True
) -> dict[str, type[Agent]]:
    """All agent types by type name, from entry points and ``specs``."""
    found: dict[str, tuple[type[Agent], str]] = {}

    def add(cls: type[Agent], origin: str) -> None:
        previous = found.get(cls.type_name)
        if previous is not None and previous[0] is not cls:
            raise PluginError(
                f"plugin {origin}: type name {cls.type_name!r} is already provided by "
                f"plugin {previous[1]}"
            )
        found[cls.type_name] = (cls, origin)

    if use_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            origin = f"entry point {ep.name} = {ep.value}"
            try:
                loaded = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {origin}: load failed: {type(exc).__name__}: {exc}"
                ) from exc
            add(validate_agent_class(loaded, origin), origin)
    for spec in specs:
        add(load_spec(spec), spec)
    if not found:
        raise PluginError("no agent types: install a plugin or pass --agents module:Class")
    return {name: cls for name, (cls, _) in found.items()}
