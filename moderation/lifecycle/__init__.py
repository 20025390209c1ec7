"""The policy lifecycle: what a change to a policy would do before it ships.

`diff` compares two policies, `backtest` replays a candidate over the logged history (from the
stored embeddings, no images and no GPU), `shadow_report` sums up a candidate that was scored
beside the live policy on live traffic; both reports share one shape (`report`).
"""
