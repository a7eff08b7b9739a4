"""The OpenAPI document (``/openapi.json``, ``/docs``): what every HTTP endpoint takes and answers,
errors included, so that a client generated from it (or schemathesis) sees the server as it is."""

from __future__ import annotations

import copy

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.protocol import MAX_GENERATE_TOKENS, ErrorBody, GenerateRequest, HealthReply

REF = "#/components/schemas/{model}"
ERRORS = {400: "a prompt that is not usable MIDI", 401: "no or a wrong API key", 403: "a Host or Origin not served",
          413: "an upload over --max-upload-bytes", 415: "a body that is neither JSON nor multipart",
          422: "a value out of range or a malformed body", 429: "too many requests from this client",
          500: "a server error (a bug)", 503: "the server is busy"}


def error_responses(*codes: int) -> dict:
    return {code: {"description": ERRORS[code], "content": {"application/json": {"schema": {
        "$ref": REF.format(model="ErrorBody")}}}} for code in codes}


def generate_operation() -> dict:
    """``openapi_extra`` of ``POST /generate``: the JSON and multipart bodies it reads itself."""
    schema = GenerateRequest.model_json_schema(ref_template=REF)
    form = {"prompt": {"type": "string", "format": "binary", "description": "a .mid prompt"}}
    for name, prop in schema["properties"].items():
        if name in ("prompt_midi", "prompt_notes"):
            continue
        prop = copy.deepcopy(prop)
        choices = [p for p in prop.pop("anyOf", [prop]) if p.get("type") != "null"]
        form[name] = {**choices[0], **{k: v for k, v in prop.items() if k not in ("default",)}}
    return {"requestBody": {"required": False, "content": {
        "application/json": {"schema": {"$ref": REF.format(model="GenerateRequest")}},
        "multipart/form-data": {"schema": {"type": "object", "properties": form, "additionalProperties": False},
                                "encoding": {"prompt": {"contentType": "application/octet-stream"}}}}}}


GENERATE_RESPONSES = {200: {"description": f"the generated .mid (at most {MAX_GENERATE_TOKENS} tokens)", "content": {
    "audio/midi": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(400, 401, 403, 413, 415, 422, 429, 500, 503)}
HEALTH_RESPONSES = {200: {"description": "the model is loaded and the engine runs", "content": {
    "application/json": {"schema": {"$ref": REF.format(model="HealthReply")}}}},
    503: {"description": "the engine stopped", "content": {
        "application/json": {"schema": {"$ref": REF.format(model="HealthReply")}}}}, **error_responses(403)}
METRICS_RESPONSES = {200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {
    "type": "string"}}}}, **error_responses(401, 403)}


def install(app: FastAPI) -> None:
    """Serve the document with the wire models in ``components.schemas``."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in (GenerateRequest, ErrorBody, HealthReply):
                found = model.model_json_schema(ref_template=REF)
                schemas.update(found.pop("$defs", {}))
                schemas[model.__name__] = found
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
