"""Fast nn.Modules built on :mod:`vitkernels.ops`, drop-in replacements for their timm / official counterparts."""

from vitkernels.modules.linear import Linear  # noqa: E402,F401

__all__ = ["Linear"]
