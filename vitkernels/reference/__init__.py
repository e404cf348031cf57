"""Pure-PyTorch reference ops and modules: the specification of vitkernels, and its CPU fallback of last resort.

Readable, close to the papers' official code and to timm (same module names, constructor arguments and
state-dict keys), and imports nothing else of the package but the neutral helpers every backend shares
(:mod:`vitkernels.geometry`, :mod:`vitkernels.loss_helpers`). One file per op, named like the op in the other layers
(``reference/window_partition.py`` next to ``ops/``, ``triton/``, ``csrc/cpu/`` files of the same name); this
package does not re-export a function named like its module, so ``vitkernels.reference.window_partition`` stays
the module.
"""
from vitkernels.reference.layers import DropPath, Mlp

__all__ = ["DropPath", "Mlp"]
