"""Registers every `torch.ops.sparselora` op the rewritten graphs call; each op's kernel,
autograd and autocast rule live together in its module:

- token_rows.py       `token_rows`: the dense/context row split of a forward
- select_channels.py  `select_mlp`, `select_plain_mlp`, `select_attention`: the estimator's
                      top-k channels
- sparse_linear.py    `out_sparse_linear`, `in_sparse_linear`, `mask_channels` (+ grads)
- sparse_mlp.py       `sparse_mlp` (+ grad): a frozen gated MLP without LoRA, at width k

Everything data-dependent (the token split, the dense warm-up switch, top-k) happens
inside these opaque ops, so a compiled graph keeps static shapes and never recompiles
when the step schedule flips from dense to sparse. How they are registered: library.py.
"""
from . import select_channels, sparse_linear, sparse_mlp, token_rows  # noqa: F401
from .token_rows import dense_token_rows, shared_token_rows  # noqa: F401  the front door's entry points
