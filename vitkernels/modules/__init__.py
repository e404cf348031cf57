"""Fast nn.Modules built on :mod:`vitkernels.ops`, drop-in replacements for their timm / official counterparts."""
