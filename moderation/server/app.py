"""The routes of `moderation serve`: OpenAI's `/v1/moderations`, our `/v1/moderate`,
`/v1/decisions/{id}`, `/healthz`, `/readyz`, `/metrics` (and FastAPI's `/openapi.json`)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from moderation.engine import Moderator
from moderation.server import errors
from moderation.server.config import ServeConfig
from moderation.server.documents import live_document, logged_document
from moderation.server.errors import APIError
from moderation.server.limits import Outer
from moderation.server.schemas import ModerateRequest, ModerationsRequest, openai_images
from moderation.server.scores import moderation_result
from moderation.server.service import Service, request_id


def _service(request: Request) -> Service:
    return request.app.state.service


async def api_key(request: Request) -> str | None:
    """Every /v1/* route needs `Authorization: Bearer KEY` (unless --no-auth)."""
    return _service(request).key_name(request.headers.get("authorization"))


def _metas(name: str | None, endpoint: str, rid: str, n: int, caller: dict | None = None):
    """Each image's logged metadata: the caller's, the key's name, where it came from. The key's
    name is also the `user` unless the caller named one (`decisions list --user NAME`)."""
    base = dict(caller or {})
    if name is not None:
        base["api_key"] = name
        base.setdefault("user", name)
    base.update({"endpoint": endpoint, "request_id": rid})
    return [{**base, "input_index": i} for i in range(n)]


def _png_data_url(image) -> str | None:
    if image is None:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def create_app(moderator: Moderator, config: ServeConfig | None = None) -> Any:
    """The ASGI app serving `moderator` (wrapped in the body-size limit)."""
    config = config or ServeConfig()
    service = Service(moderator, config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="moderation",
        summary="Policy-driven image moderation: OpenAI-compatible, logged, reviewable.",
        lifespan=lifespan,
    )
    app.state.service = service
    errors.install(app)

    @app.post("/v1/moderations", tags=["moderation"])
    async def moderations(
        body: ModerationsRequest, key: str | None = Depends(api_key)
    ) -> JSONResponse:
        """OpenAI's moderation endpoint: one result for the request's images (text is not
        judged: `category_applied_input_types` lists only "image")."""
        sources, _texts = openai_images(body)
        if not sources:
            raise APIError(
                400,
                "no image in input: this service judges images only (text is not judged)",
                code="no_image_input",
                param="input",
            )
        rid = request_id("modr")
        metas = _metas(key, "/v1/moderations", rid, len(sources))
        raws, judged = await service.judge_sources(sources, metas, bare_base64=False)
        failed = [(raw, j) for raw, j in zip(raws, judged, strict=True) if j.image is None]
        if failed:
            raw, j = failed[0]
            raise APIError(
                400,
                f"{j.decision.error} (logged as decision {j.decision.decision_id}, action "
                f"{j.decision.action})",
                code="image_undecodable",
                param=raw.where,
            )
        policy = moderator.policy
        return JSONResponse(
            {
                "id": rid,
                "model": policy.name,
                "results": [moderation_result(policy, [j.decision for j in judged])],
            }
        )

    @app.post(
        "/v1/moderate",
        tags=["moderation"],
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {"schema": ModerateRequest.model_json_schema()},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "images": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                },
                                "metadata": {"type": "string", "description": "a JSON object"},
                                "return_images": {"type": "boolean"},
                                "top": {"type": "integer"},
                            },
                            "required": ["images"],
                        }
                    },
                },
                "required": True,
            }
        },
    )
    async def moderate(request: Request, key: str | None = Depends(api_key)) -> JSONResponse:
        """Several images (JSON: data URLs or base64; multipart: files), caller metadata; every
        image's full decision (the `check --json` object) and, if asked, the moderated PNG."""
        body, raws = await _moderate_body(request)
        from moderation.storage.storable import MetadataError, check_metadata

        try:
            check_metadata(body.metadata, "metadata")
        except MetadataError as err:
            raise APIError(422, str(err), code="invalid_metadata", param="metadata") from None
        rid = request_id("mod")
        if raws is None:
            sources = [(f"images[{i}]", s) for i, s in enumerate(body.images)]
            metas = _metas(key, "/v1/moderate", rid, len(sources), body.metadata)
            _raws, judged = await service.judge_sources(sources, metas, bare_base64=True)
        else:
            metas = _metas(key, "/v1/moderate", rid, len(raws), body.metadata)
            judged = await service.judge_raws(raws, metas)

        def shape() -> list[dict]:
            results = []
            for i, j in enumerate(judged):
                entry = {"index": i, "decision": live_document(j.decision, j.recorded, body.top)}
                if body.return_images:
                    entry["image"] = _png_data_url(j.image)
                results.append(entry)
            return results

        return JSONResponse({"id": rid, "results": await run_in_threadpool(shape)})

    async def _moderate_body(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            return await _multipart(request)
        try:
            data = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "body: not valid JSON", code="invalid_json") from None
        try:
            return ModerateRequest.model_validate(data), None
        except ValidationError as err:
            from fastapi.exceptions import RequestValidationError

            raise RequestValidationError(err.errors()) from None

    async def _multipart(request: Request):
        from moderation.server.inputs import RawImage

        form = await request.form(max_files=config.max_images + 1, max_fields=64)
        files = form.getlist("images")
        raws = []
        for i, f in enumerate(files):
            if isinstance(f, str):
                raise APIError(400, f"images[{i}]: expected a file", param=f"images[{i}]")
            raws.append(RawImage(f"images[{i}]", await f.read()))
        fields: dict[str, Any] = {"images": [""] * len(files)}
        if "metadata" in form:
            try:
                fields["metadata"] = json.loads(str(form["metadata"]))
            except ValueError:
                raise APIError(422, "metadata: not a JSON object", param="metadata") from None
        for name in ("return_images", "top"):
            if name in form:
                fields[name] = str(form[name])
        try:
            body = ModerateRequest.model_validate(fields)
        except ValidationError as err:
            from fastapi.exceptions import RequestValidationError

            raise RequestValidationError(err.errors()) from None
        if len(raws) > config.max_images:
            raise APIError(400, f"more than {config.max_images} images", code="too_many_images")
        return body, raws

    @app.get("/v1/decisions/{decision_id}", tags=["decisions"])
    async def decision(decision_id: str, _key: str | None = Depends(api_key)) -> JSONResponse:
        """The `decisions show --json` document of a logged decision (id or 8+ char prefix)."""
        from moderation.decisions.browser import DecisionError

        if service.url is None:
            raise APIError(404, "this service logs no decisions", code="not_found")
        try:
            doc = await run_in_threadpool(logged_document, service.url, decision_id)
        except DecisionError as err:
            raise APIError(404, str(err), code="decision_not_found", param="id") from None
        except Exception as err:
            raise APIError(
                503, f"the decision log cannot be read now: {err}", code="database_unavailable"
            ) from None
        return JSONResponse(json.loads(json.dumps(doc, default=str)))

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"])
    async def readyz() -> dict:
        """The model is loaded; says whether decisions reach the database or the spool."""
        return await service.readiness()

    @app.get("/metrics", tags=["service"])
    async def metrics() -> Response:
        """Prometheus text: requests, images, decisions by action, batch sizes, queue depth,
        latencies, unrecorded decisions."""
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    wrapped = Outer(app, config.max_body_bytes, service.metrics)
    wrapped.fastapi = app  # type: ignore[attr-defined]
    return wrapped
