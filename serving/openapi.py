"""The OpenAPI 3 document a serving node publishes at /openapi.json (the Open Inference Protocol REST API)."""

from __future__ import annotations

from typing import Any

_tensor_in = {
    "type": "object", "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                                "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]},
        "parameters": {"type": "object"},
        "data": {"description": "row-major values, flat or nested; absent with binary_data_size"},
    },
}
_tensor_out = {
    "type": "object", "required": ["name", "shape", "datatype"],
    "properties": {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                   "datatype": {"type": "string"}, "parameters": {"type": "object"}, "data": {"type": "array"}},
}
_error = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_meta_tensor = {"type": "object", "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                                 "shape": {"type": "array", "items": {"type": "integer"}}}}


def _json(ref: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _errors(*codes: int) -> dict[str, Any]:
    why = {400: "invalid request, or a response over MODELCD_MAX_RESPONSE_BYTES (the reason says what)",
           404: "no such model, version or endpoint (once the node has read the target state)",
           405: "method not allowed (the Allow header names the ones that are)",
           413: "body over MODELCD_MAX_REQUEST_BYTES (inflated, for a compressed body)",
           415: "a Content-Encoding other than gzip, deflate or identity",
           500: "the model raised while predicting",
           503: "node starting, model deployed but still loading or failed to load, model busy, or "
                "MODELCD_MAX_INFLIGHT_BYTES in flight; Retry-After says when to retry",
           504: "the model did not answer within MODELCD_PREDICT_TIMEOUT"}
    retry = {"headers": {"Retry-After": {"description": "seconds to wait before retrying",
                                         "schema": {"type": "integer"}}}}
    return {str(c): {"description": why[c], **_json("Error"), **(retry if c == 503 else {})} for c in codes}


_name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "model name, or endpoint name (routed through its traffic policy)"}
_version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
_request_id_header = {"x-request-id": {"description": "the request id: the body's `id`, else the request's "
                                                      "x-request-id header, else one the node made; the "
                                                      "`request_id` of the prediction log",
                                       "schema": {"type": "string"}}}
_infer = {
    "post": {
        "summary": "Inference",
        "parameters": [{"name": "Content-Encoding", "in": "header", "required": False,
                        "schema": {"type": "string", "enum": ["gzip", "deflate", "identity"]},
                        "description": "a compressed body is inflated up to MODELCD_MAX_REQUEST_BYTES"},
                       {"name": "x-request-id", "in": "header", "required": False, "schema": {"type": "string"},
                        "description": "the request id when the body has no `id`"}],
        "requestBody": {"required": True, **_json("InferenceRequest")},
        "responses": {"200": {"description": "outputs, the model name and version that answered, and the "
                                             "request id (`id`)",
                              "headers": _request_id_header, **_json("InferenceResponse")},
                      **_errors(400, 404, 405, 413, 415, 500, 503, 504)},
    }
}
_meta = {"get": {"summary": "Model metadata", "responses": {"200": {"description": "signature",
                                                                   **_json("ModelMetadata")},
                                                           **_errors(404, 503)}}}
_ready = {"get": {"summary": "Model readiness", "responses": {"200": {"description": "ready"},
                                                              **_errors(404, 503)}}}


def _with(params: list[dict[str, Any]], op: dict[str, Any]) -> dict[str, Any]:
    return {"parameters": params, **op}


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "modelcd serving node", "version": "2",
             "description": "Open Inference Protocol (KServe V2) REST, with Triton's binary tensor extension."},
    "paths": {
        "/v2": {"get": {"summary": "Server metadata", "responses": {"200": {"description": "name, version, "
                                                                                          "extensions"}}}},
        "/v2/health/live": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
        "/v2/health/ready": {"get": {"summary": "Readiness (caught up, hot set loaded, not stopping)",
                                     "responses": {"200": {"description": "ready"}, **_errors(503)}}},
        "/v2/models/{name}": _with([_name], _meta),
        "/v2/models/{name}/ready": _with([_name], _ready),
        "/v2/models/{name}/infer": _with([_name], _infer),
        "/v2/models/{name}/versions/{version}": _with([_name, _version], _meta),
        "/v2/models/{name}/versions/{version}/ready": _with([_name, _version], _ready),
        "/v2/models/{name}/versions/{version}/infer": _with([_name, _version], _infer),
        "/v2/repository/index": {"post": {
            "summary": "Repository index: every model version on this node and its state",
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"ready": {"type": "boolean",
                                                           "description": "only the READY ones"}}}}}},
            "responses": {"200": {"description": "one entry per model version", "content": {"application/json": {
                "schema": {"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string"}, "version": {"type": "string"},
                    "state": {"type": "string", "enum": ["READY", "LOADING", "UNAVAILABLE"]},
                    "reason": {"type": "string"}}}}}}}, **_errors(400)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format"}}}},
    },
    "components": {"schemas": {
        "InferenceRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "minItems": 1, "items": _tensor_in},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "parameters": {"type": "object"}}}}}},
        "InferenceResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "parameters": {"type": "object"}, "outputs": {"type": "array", "items": _tensor_out}}},
        "ModelMetadata": {"type": "object", "properties": {
            "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"}, "inputs": {"type": "array", "items": _meta_tensor},
            "outputs": {"type": "array", "items": _meta_tensor}}},
        "Error": _error,
    }},
}
