"""Policy language: load and validate moderation policies (YAML)."""

from policy.errors import PolicyError, PolicyIssue
from policy.loader import check_embed_dim, load_policy, model_embed_dim
from policy.schema import ACTION_RANK, Concept, Policy

__all__ = [
    "ACTION_RANK",
    "Concept",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "check_embed_dim",
    "load_policy",
    "model_embed_dim",
]
