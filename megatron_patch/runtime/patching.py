"""A registry of dotted-path patches: listed, applied once, removable, version-guarded.

A patch replaces the object at `target` ("package.module.attr" or "package.module.Class.attr").
Because `from x import f` leaves copies of `f` in other modules, applying a patch also rebinds every
module-level attribute in loaded `megatron.*` modules that still holds the original object, and
removing the patch puts all of them back.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# Modules whose `from x import f` copies are rebound too.
REBIND_PREFIXES = ("megatron.",)
# Stands for "the attribute did not exist" (a patch may add a name a module forgot to define).
MISSING = object()


@dataclass
class Patch:
    target: str  # dotted path of the attribute to replace
    # builds the replacement from the original (so wrappers can call through)
    make: Callable[[Any], Any]
    reason: str
    versions: str = ">=0.16.1"  # megatron-core versions this patch targets
    devices: tuple[str, ...] = ("cpu",)
    # Optional: the patch is needed only when this returns True (e.g. a bug fixed in a later version).
    needed: Callable[[], bool] | None = None
    _applied: list[tuple[Any, str, Any]] = field(default_factory=list, repr=False)

    @property
    def active(self) -> bool:
        return bool(self._applied)


def _resolve(target: str) -> tuple[Any, str]:
    """Return (owner object, attribute name) for a dotted path, importing the longest module prefix."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:-1]:
            owner = getattr(owner, attr)
        return owner, parts[-1]
    raise ImportError(f"cannot resolve patch target {target}")


def megatron_core_version() -> Version:
    from importlib.metadata import version

    return Version(version("megatron-core"))


class PatchRegistry:
    def __init__(self) -> None:
        self._patches: list[Patch] = []

    def register(self, patch: Patch) -> Patch:
        self._patches.append(patch)
        return patch

    def add(self, target: str, reason: str, versions: str = ">=0.16.1", devices=("cpu",), needed=None):
        """Decorator form: the decorated function receives the original and returns the replacement."""

        def wrap(make):
            self.register(Patch(target, make, reason, versions, tuple(devices), needed))
            return make

        return wrap

    @property
    def patches(self) -> list[Patch]:
        return list(self._patches)

    def status(self, device_type: str) -> list[dict]:
        """One row per patch: whether it is active, and why (or why not)."""
        rows = []
        mcore = megatron_core_version()
        for p in self._patches:
            applies, why = self._applies(p, device_type, mcore)
            rows.append({"target": p.target, "active": p.active, "applies": applies,
                         "why": p.reason if applies else why, "versions": p.versions,
                         "devices": list(p.devices)})
        return rows

    @staticmethod
    def _applies(p: Patch, device_type: str, mcore: Version) -> tuple[bool, str]:
        if device_type not in p.devices:
            return False, f"not needed on {device_type}"
        if mcore not in SpecifierSet(p.versions):
            return False, f"megatron-core {mcore} outside {p.versions}"
        if p.needed is not None and not p.needed():
            return False, "not needed with this installation"
        return True, p.reason

    def apply(self, device_type: str) -> list[Patch]:
        mcore = megatron_core_version()
        applied = []
        for p in self._patches:
            if p.active or not self._applies(p, device_type, mcore)[0]:
                continue
            owner, name = _resolve(p.target)
            original = getattr(owner, name, MISSING)
            # Class attributes: keep staticmethod/classmethod wrappers as they are declared.
            raw = owner.__dict__.get(name, original) if isinstance(owner, type) else original
            # Wrap the plain function under a staticmethod/classmethod, then re-declare it as such.
            replacement = p.make(raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else original)
            if isinstance(raw, staticmethod):
                replacement = staticmethod(replacement)
            elif isinstance(raw, classmethod):
                replacement = classmethod(replacement)
            setattr(owner, name, replacement)
            p._applied.append((owner, name, raw))
            if not isinstance(owner, type) and original is not MISSING and callable(original):
                p._applied.extend(_rebind_copies(original, getattr(owner, name)))
            applied.append(p)
        return applied

    def remove_all(self) -> None:
        for p in reversed(self._patches):
            for owner, name, original in reversed(p._applied):
                if original is MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
            p._applied.clear()


def _rebind_copies(original: Any, replacement: Any) -> list[tuple[Any, str, Any]]:
    """Rebind module globals that hold `original` (copies made by `from x import f`)."""
    rebound = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or not mod_name.startswith(REBIND_PREFIXES):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, replacement)
                rebound.append((module, attr, original))
    return rebound
