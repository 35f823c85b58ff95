"""config/: the settings (pydantic-settings models, ``FACTORY_*`` env and TOML loading, validation), settings
read from files (``*_FILE`` secrets, the trust checks of config files: :mod:`.trust`), Redis URLs, the recovery
commands' few settings read from every source (:mod:`.essentials`), and the defaults and lease arithmetic the
CLI's early path shares (:mod:`.defaults`, :mod:`.leases`; these, :mod:`.trust` and :mod:`.essentials` are
standard library only).

May import: nothing of factory_worker (the bottom room). Importing this package is cheap: the settings'
public names (``Settings``, ``load_settings``, ``ConfigError``, ...) load on first use.
"""

import importlib
import importlib.util
from typing import Any


def __getattr__(name: str) -> Any:  # PEP 562: ``from factory_worker.config import Settings`` keeps working
    if name.startswith("__"):
        raise AttributeError(name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: never load the settings for it
        return importlib.import_module(f"{__name__}.{name}")
    settings = importlib.import_module("factory_worker.config.settings")
    try:
        return getattr(settings, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
