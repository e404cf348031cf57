"""Functional ops: argument checks, backend dispatch (:mod:`vitkernels.dispatch`) and the torch.library custom ops.

One file per op, named like the op; importing it registers its implementations with the dispatcher. The public
functions are re-exported from the top-level package (``vitkernels.window_partition``); this package does not
re-export them, so that ``vitkernels.ops.window_partition`` stays the module.
"""
from vitkernels.ops import bias_gelu  # noqa: F401
from vitkernels.ops import bias_layernorm_residual  # noqa: F401
from vitkernels.ops import bias_residual  # noqa: F401
from vitkernels.ops import bias_residual_layernorm  # noqa: F401
from vitkernels.ops import dino_loss  # noqa: F401
from vitkernels.ops import gelu_mlp  # noqa: F401
from vitkernels.ops import linear  # noqa: F401
from vitkernels.ops import mae_loss  # noqa: F401
from vitkernels.ops import masking  # noqa: F401
from vitkernels.ops import msn_loss  # noqa: F401
from vitkernels.ops import patch_embed  # noqa: F401
from vitkernels.ops import patch_merging  # noqa: F401
from vitkernels.ops import window_attention  # noqa: F401
from vitkernels.ops import window_attention_3d  # noqa: F401
from vitkernels.ops import window_attention_v2  # noqa: F401
from vitkernels.ops import window_partition  # noqa: F401
