"""The review queue: leased claims on held decisions, verdicts, explanations and reports."""

from moderation.review.queries import Claim, ReviewItemView
from moderation.review.queue import ReviewQueue
from moderation.review.rules import ReviewError

__all__ = ["Claim", "ReviewError", "ReviewItemView", "ReviewQueue"]
