"""Tools to property-test rewrites and policies: hypothesis strategies that build LoRA
blocks (`strategies`), the eager reference semantics (`reference`), and
`assert_rewrite_equivalent`, which checks a compiled model against them."""
from .equivalence import Comparison, assert_rewrite_equivalent
from .reference import reference_semantics

__all__ = ["assert_rewrite_equivalent", "Comparison", "reference_semantics"]
