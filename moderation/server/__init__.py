"""`moderation serve`: the HTTP service (FastAPI) in front of one Moderator.

One module per job: `config` (the command's settings), `app` (the routes), `service` (the
state the routes share: images of a request -> decisions), `schemas` (request bodies),
`inputs` (data URLs, base64 and allowed remote URLs to decoded images, within limits),
`batching` (concurrent requests coalesced into engine batches, with back-pressure), `keys`
(API keys: stored hashes, the live set the service checks), `scores` (OpenAI's response shape
from our decisions), `documents` (the decision documents `/v1/moderate` and `/v1/decisions`
return), `errors` (OpenAI's error shape), `limits` (the ASGI layer: body limit, metrics, an
escaped access log), `metrics` (Prometheus) and `run` (uvicorn, in the foreground or a thread).
"""
