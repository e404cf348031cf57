"""Import-only stand-in for torchvision, used by the tests to import timm.

timm imports a handful of torchvision names at module import time (``ops.misc.FrozenBatchNorm2d``, the
``transforms`` and ``datasets`` modules) but none of them on the Swin / ViT / DeiT code paths the tests use.
The PyPI torchvision wheel cannot be imported beside a CPU build of torch, so ``tests/conftest.py`` puts this
directory on ``sys.path`` only when the real torchvision fails to import.

Every submodule (``torchvision.x.y``) imports, and every name in it resolves to a placeholder class that
raises if it is ever instantiated, so a test that accidentally depends on torchvision fails loudly.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+vitkernels-test-stub"
IS_VITKERNELS_STUB = True


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        # Enum-like access such as InterpolationMode.BILINEAR: a distinct, hashable member.
        member = f"{cls.__name__}.{name}"
        setattr(cls, name, member)
        return member


class _Placeholder(metaclass=_PlaceholderMeta):
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"{type(self).__module__}.{type(self).__name__} is a test stub: the real torchvision is not installed"
        )


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = _PlaceholderMeta(name, (_Placeholder,), {"__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        parent, _, child = module.__name__.rpartition(".")
        setattr(sys.modules[parent], child, module)


sys.meta_path.insert(0, _StubFinder())
sys.modules[__name__].__class__ = _StubModule
