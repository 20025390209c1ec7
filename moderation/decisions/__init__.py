"""The decisions read side: the decision document, the decision browser and its queries."""
