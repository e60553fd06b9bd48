"""The method registry.

A method is a module (or any object) with:

- ``NAME``: its registry name;
- ``DESCRIPTION``: one line for ``kembed ls``;
- ``Config``: a pydantic model of its recipe section (unknown keys rejected);
- ``train(ctx: kembed.methods.base.TrainContext) -> None``: turns canonical records into
  training examples and trains through ``kembed.trainer.fit``.

Built-in methods are listed in ``BUILTIN``; third-party packages add theirs through the
``kembed.methods`` entry-point group (``name = "package.module"``). Modules are imported only
when a method is used, so listing methods stays cheap.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from kembed.errors import KembedError

BUILTIN = {
    "cpt": "kembed.methods.cpt",
    "sft": "kembed.methods.sft",
    "cpt-sft": "kembed.methods.cpt_sft",
    "raft": "kembed.methods.raft",
    "simrag": "kembed.methods.simrag",
    "rlag": "kembed.methods.rlag",
}

ENTRY_POINT_GROUP = "kembed.methods"


def available() -> dict[str, str]:
    """Method name -> module path, built-ins first, then entry points."""
    methods = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        methods.setdefault(ep.name, ep.value)
    return methods


def get_method(name: str):
    """Import and return the method module registered as ``name``.

    Raises:
        KembedError: no method of that name.
    """
    methods = available()
    if name not in methods:
        raise KembedError(f"unknown method '{name}' (available: {', '.join(sorted(methods))})")
    return importlib.import_module(methods[name].split(":")[0])
