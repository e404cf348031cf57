"""Functional ops: argument checks, backend dispatch (:mod:`vitkernels.dispatch`) and the torch.library custom ops.

One file per op, named like the op; importing it registers its implementations with the dispatcher. The public
functions are re-exported from the top-level package (``vitkernels.window_partition``); this package does not
re-export them, so that ``vitkernels.ops.window_partition`` stays the module.
"""
from vitkernels.ops import window_partition  # noqa: F401  (registers the op)
from vitkernels.ops import mae_loss, masking  # noqa: F401  (register the MAE / MSN ops)
