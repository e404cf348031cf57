"""Interoperability with timm and the official repositories' checkpoints."""
