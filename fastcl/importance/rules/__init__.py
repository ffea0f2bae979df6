"""Per-op rules of the importance engine: one module per recognised op, one line each below.

See :mod:`.base` for the :class:`Rule` interface and :func:`register_rule`.
"""
from .base import Call, Rule, register_rule, registered_rules, rule_for
from .batch_norm import BatchNormRule
from .conv import ConvRule
from .embedding import EmbeddingRule
from .group_norm import GroupNormRule
from .layer_norm import LayerNormRule
from .linear import LinearRule
from .matmul import AddmmRule, MatmulRule
from .rms_norm import RMSNormRule

__all__ = ["Call", "Rule", "register_rule", "registered_rules", "rule_for"]

register_rule(LinearRule())
register_rule(AddmmRule())
register_rule(MatmulRule())
register_rule(ConvRule())
register_rule(EmbeddingRule())
register_rule(LayerNormRule())
register_rule(GroupNormRule())
register_rule(BatchNormRule())
if RMSNormRule.functions:
    register_rule(RMSNormRule())
