"""`moderation serve`: the HTTP service (FastAPI) in front of one Moderator.

One module per job: `config` (the command's settings), `errors` (OpenAI's error shape),
`keys` (API keys: stored hashes, the live set the service checks), `inputs` (data URLs, base64
and allowed remote URLs to decoded images, within limits), `batching` (concurrent requests
coalesced into engine batches, with back-pressure), `scores` (OpenAI's response shape from our
decisions), `documents` (the decision documents the endpoints return), `metrics` (Prometheus),
`app` (the routes) and `run` (uvicorn).
"""
