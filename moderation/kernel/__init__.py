"""The decision kernel: the one decision rule (`rule`) and the one decision document
(`document`, `logged`). It imports nothing from the engine core, the review queue or the CLI,
so that each of them builds on it: the engine decides through `rule`, and every reader of a
decision (check, the decisions browser, review show and export, the HTTP API) prints it
through `document`."""
