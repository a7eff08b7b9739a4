"""schemathesis over ``/openapi.json`` against a real server: no 5xx, and every response (status,
content type, headers, body) as the document says. A bounded number of examples per operation."""

from __future__ import annotations

import json
import urllib.request

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)
from schemathesis.checks import not_a_server_error


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
EXAMPLES = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def test_every_operation_answers_as_documented(live_server):
    schema = schemathesis.openapi.from_url(f"{live_server.http_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/generate", "/health", "/metrics"}
    for operation in operations:

        @EXAMPLES
        @given(case=operation.as_strategy())
        def check(case) -> None:
            case.call_and_validate(checks=CHECKS, timeout=120)

        check()


def test_the_document_resolves_every_reference(live_server):
    with urllib.request.urlopen(f"{live_server.http_url}/openapi.json", timeout=30) as response:
        document = json.loads(response.read())
    text = json.dumps(document)
    refs = {part.split('"')[0] for part in text.split('"$ref": "')[1:]}
    names = {"#/components/schemas/" + name for name in document["components"]["schemas"]}
    assert refs and refs <= names, refs - names
    generate = document["paths"]["/generate"]["post"]
    assert {"400", "413", "415", "422", "503"} <= set(generate["responses"])
    form = generate["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["tokens"]["type"] == "integer" and form["prompt"]["format"] == "binary"
