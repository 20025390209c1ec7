"""The review desk: `moderation review serve`, the reviewers' web pages over the review queue.

accounts (users, roles, argon2id passwords), sessions (cookies, CSRF, login throttling), access
(who may see which item), audit (the desk's own events), images (blurred renditions), leases
(renewal and release of a claim), listing (the pages' queries), webhooks (outbox delivery),
documents (the decision documents the pages show), app (FastAPI) and its routes.
"""

from moderation.desk.accounts import ROLES, DeskError

__all__ = ["ROLES", "DeskError"]
