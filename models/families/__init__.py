"""Model families by name: the one list the config, the trainer and the loader use.

A family is a class implementing :class:`models.family.ModelFamily`, registered
under one or more names with :func:`register_family`. The pipeline's ``kind``
setting is such a name; a saved bundle records it, and loading dispatches on it.

Adding a family is one module (the class, decorated with ``@register_family``)
plus its line in :data:`BUILTIN_MODULES`. The modules are imported on the first
lookup, not when this package is imported: naming the families costs nothing
until someone asks for one, and importing the config does not load torch.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from models.family import ModelFamily

#: One line per built-in family module; each registers its names on import.
BUILTIN_MODULES: tuple[str, ...] = (
    "models.families.autoencoder",
    "models.families.sequence",
)

#: The family of the default config.
DEFAULT_FAMILY = "ae"

#: Bundles written before families existed record none: they are autoencoders.
LEGACY_FAMILY = "ae"

#: Settings that say how to run a model, not which model it is.
RUN_SETTINGS = frozenset({"device", "verbose", "epoch_callback"})

#: Settings the trainer derives from the preprocessed layout (which columns
#: one-hot encode one categorical), never from the config: the same config on
#: the same columns gives the same values, so they never decide a retrain.
DERIVED_SETTINGS = frozenset({"one_hot_groups"})

_F = TypeVar("_F", bound=type)


def model_params(settings: Mapping[str, Any], n_clusters: int | None) -> dict[str, Any]:
    """The settings that define a model, from a family's settings.

    The one definition of "model params": the config's requested ones and a
    saved champion's are both made here, so they compare like for like (any
    difference retrains).
    """
    params = {
        k: v
        for k, v in settings.items()
        if k not in RUN_SETTINGS and k not in DERIVED_SETTINGS
    }
    params["n_clusters"] = n_clusters
    return params


_registry: dict[str, type[ModelFamily]] = {}
_lock = threading.RLock()
_builtins_loaded = False
_builtins_loading = False


class FamilyError(ValueError):
    """A family name that cannot be registered or looked up (one-line message)."""


class UnknownFamilyError(FamilyError):
    """No family is registered under the name asked for."""


def _load_builtins() -> None:
    global _builtins_loaded, _builtins_loading
    if _builtins_loaded:
        return
    # Other threads wait on the lock until every built-in is in; the loading
    # thread itself re-enters (a built-in registers through this package).
    with _lock:
        if _builtins_loaded or _builtins_loading:
            return
        _builtins_loading = True
        try:
            for module in BUILTIN_MODULES:
                importlib.import_module(module)
            _builtins_loaded = True
        finally:
            _builtins_loading = False


def register_family(*names: str) -> Callable[[_F], _F]:
    """Class decorator: register a :class:`ModelFamily` under ``names``.

    A name already taken is refused (``FamilyError``): two families answering
    to one name would make saved bundles ambiguous.
    """
    if not names or not all(isinstance(n, str) and n.strip() == n and n for n in names):
        raise FamilyError(f"family names must be non-empty strings, got {names!r}")

    def decorator(cls: _F) -> _F:
        _load_builtins()
        with _lock:
            taken = [n for n in names if n in _registry]
            if taken or len(set(names)) != len(names):
                owner = _registry[taken[0]] if taken else cls
                raise FamilyError(
                    f"model family {(taken or list(names))[0]!r} is already"
                    f" registered (by {owner.__module__}.{owner.__qualname__})"
                )
            for name in names:
                _registry[name] = cls
        return cls

    return decorator


def unregister_family(name: str) -> None:
    """Remove ``name`` (tests that register a family clean up with this)."""
    with _lock:
        if _registry.pop(name, None) is None:
            raise UnknownFamilyError(_unknown(name))


def family_names() -> tuple[str, ...]:
    """Every registered name: the built-ins in :data:`BUILTIN_MODULES` order,
    then the others, each module's names in registration order.

    Sorted rather than taken as registered: importing one built-in module
    first registers the others while it is still being imported.
    """
    _load_builtins()
    with _lock:
        families = dict(_registry)
    rank = {module: i for i, module in enumerate(BUILTIN_MODULES)}
    return tuple(
        sorted(
            families,
            key=lambda n: rank.get(families[n].__module__, len(rank)),
        )
    )


def get_family(name: str) -> type[ModelFamily]:
    """The family registered as ``name``; ``UnknownFamilyError`` listing the
    registered names otherwise."""
    _load_builtins()
    with _lock:
        family = _registry.get(name)
    if family is None:
        raise UnknownFamilyError(_unknown(name))
    return family


def _unknown(name: object) -> str:
    return f"unknown model family {name!r}; registered: {', '.join(family_names())}"


__all__ = [
    "BUILTIN_MODULES",
    "DEFAULT_FAMILY",
    "LEGACY_FAMILY",
    "FamilyError",
    "UnknownFamilyError",
    "family_names",
    "get_family",
    "register_family",
    "unregister_family",
]
