"""Shared machinery of the in-place adapters (:mod:`vitkernels.compat.transformers`, :mod:`vitkernels.compat.monai`).

A supported layer is patched by switching its class to a subclass ``Fused<Layer>`` = (adapter mixin, original class)
whose method runs the fused op: every attribute, submodule, parameter, buffer, hook and ``isinstance`` test of the
other library stays as it was. The subclasses are created once per class, on demand (the other library is imported
only then), and are attributes of the adapter module, so a pickled patched model loads.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Dict, List, Optional, Tuple, Type, Union

from torch import nn


class NotPatchedWarning(UserWarning):
    """Some layers of a model were left on their original code (the message says which and why)."""


class FusedModule:
    """Base of every fused layer class: the op's backend, and the class to go back to."""

    vitkernels_backend: Optional[str] = None
    _vk_original_class: Type[nn.Module]


class FusedClasses:
    """The fused subclasses of one adapter.

    ``supported`` maps a class name to its module (only that class of that module is patched); ``make(cls)``
    returns ``(mixin, class attributes)`` for the subclass, or a string saying why ``cls`` cannot be patched.
    """

    def __init__(self, owner: str, supported: Dict[str, str],
                 make: Callable[[type], Union[Tuple[type, dict], str]]):
        self.owner = owner
        self.supported = supported
        self.make = make
        self._classes: Dict[type, Union[type, str]] = {}

    def matches(self, cls: type) -> bool:
        return self.supported.get(cls.__name__) == cls.__module__

    def fused(self, cls: type) -> Union[type, str]:
        """The fused subclass of the supported class ``cls``, or why there is none."""
        if cls not in self._classes:
            made = self.make(cls)
            if isinstance(made, str):
                self._classes[cls] = made
            else:
                mixin, attributes = made
                self._classes[cls] = type(f"Fused{cls.__name__}", (mixin, cls), {
                    "__module__": self.owner,
                    "__doc__": f"{cls.__name__} on vitkernels' fused ops ({self.owner}).",
                    "_vk_original_class": cls,
                    **attributes,
                })
        return self._classes[cls]

    def resolve(self, name: str) -> type:
        """The class named ``name`` (``Fused<Layer>``) for the adapter module's ``__getattr__`` (unpickling)."""
        base = name[len("Fused"):] if name.startswith("Fused") else None
        if base not in self.supported:
            raise AttributeError(f"module {self.owner!r} has no attribute {name!r}")
        fused = self.fused(getattr(importlib.import_module(self.supported[base]), base))
        if isinstance(fused, str):
            raise AttributeError(fused)
        return fused


def patch_modules(model: nn.Module, patch_one: Callable[[nn.Module], Optional[str]], caller: str) -> nn.Module:
    """Apply ``patch_one`` to ``model`` and every submodule; warn once per reason about those left as they are
    (``patch_one`` returns the reason, or None when the module was patched or is not a layer of interest)."""
    left: Dict[str, List[str]] = {}
    for name, module in model.named_modules():
        reason = patch_one(module)
        if reason:
            left.setdefault(reason, []).append(name or type(module).__name__)
    for reason, names in left.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warnings.warn(f"{caller}: {len(names)} layer(s) not patched ({shown}): {reason}", NotPatchedWarning,
                      stacklevel=3)
    return model


def switch_class(module: nn.Module, fused: type, backend: Optional[str]) -> None:
    module.__class__ = fused
    module.vitkernels_backend = backend


def patch_linears(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Make every plain ``nn.Linear`` in ``model`` (``model`` itself included) a :class:`vitkernels.modules.Linear`
    by a class swap: the same object, parameters and state dict, its forward now the vitkernels linear op (CPU
    float32: oneDNN). Subclasses of ``nn.Linear`` (e.g. ``nn.MultiheadAttention``'s ``out_proj``, whose owner reads
    its weight directly) are left alone; :func:`unpatch_model` swaps them back. Returns ``model`` (modified in
    place)."""
    from vitkernels.modules.linear import Linear

    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
            module.backend = backend
            module._vk_swapped_linear = True
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Give every patched layer inside ``model`` its original class back (the Linears :func:`patch_linears`
    swapped included). Returns ``model``."""
    for module in model.modules():
        if isinstance(module, FusedModule):
            module.__class__ = module._vk_original_class
            del module.vitkernels_backend
        elif module.__dict__.pop("_vk_swapped_linear", False):
            module.__class__ = nn.Linear
            module.__dict__.pop("backend", None)
    return model


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` was switched to one of vitkernels' fused classes by an adapter's ``patch_model`` (a layer
    running the fused ops, or a stage around them: MONAI's ``BasicLayer``)."""
    return isinstance(module, FusedModule)
