"""Policy language: load, validate and compile moderation policies (YAML)."""

from typing import TYPE_CHECKING, Any

from policy.errors import PolicyError, PolicyIssue
from policy.loader import check_embed_dim, load_policy, model_embed_dim
from policy.schema import CheckpointRef, Concept, Policy
from policy.vocabulary import ACTION_RANK

if TYPE_CHECKING:
    from policy.compiled import CompiledPolicy
    from policy.compiler import compile_policy

__all__ = [
    "ACTION_RANK",
    "CheckpointRef",
    "CompiledPolicy",
    "Concept",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "check_embed_dim",
    "compile_policy",
    "load_policy",
    "model_embed_dim",
]


def __getattr__(name: str) -> Any:
    # The compiler needs torch; loading and validating a policy does not, so import it lazily.
    if name == "CompiledPolicy":
        from policy.compiled import CompiledPolicy

        return CompiledPolicy
    if name == "compile_policy":
        from policy.compiler import compile_policy

        return compile_policy
    raise AttributeError(f"module 'policy' has no attribute {name!r}")
