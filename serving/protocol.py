"""Open Inference Protocol (KServe V2) REST: the wire Structs, validation, numpy conversion.

Sans-I/O: bytes in, arrays out, arrays in, bytes out. A `TensorCodec` is built once per
model at load time from its signature, so a request only pays for what depends on it
(decoding its JSON, one `np.asarray` per input, checks against precomputed tuples).

Supported: JSON tensors (flat or nested `data`), named inputs/outputs, request `id`
and `parameters`, requested outputs, and Triton's binary tensor extension
(`Inference-Header-Content-Length`, `binary_data_size`, `binary_data` outputs), which
Triton's client uses by default. Every problem with a body is an `InvalidRequest`
(400) whose reason names the input and what was expected; that includes JSON nested
deeper than the decoder recurses (no RecursionError reaches the server) and a number
that does not fit its datatype (1e300 in an FP32 input is a 400, not a silent `inf`).

Non-finite floats: JSON has no NaN or infinity, and `null` in an FP tensor would lose which
one it was (and which it was not: a model returning `null` is not a model returning 0).
A non-finite value in an FP output is written as the string "NaN", "Infinity" or
"-Infinity" -- the canonical JSON mapping of the protocol's own protobuf (the KServe V2
gRPC definition, proto3 JSON) -- and the same strings are accepted in FP inputs. Python's
float(), numpy and JavaScript's Number() all read them back. Binary tensors carry the
IEEE values unchanged. Whether a model may return them at all is the package's business
(ingest checks the samples); the node never turns them into `null`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from modelcd.store.package import DATATYPES  # the one OIP datatype table, shared with packages

from .errors import InvalidRequest, ResponseTooLarge

# --------------------------------------------------------------------------- wire Structs


class RequestInput(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(msgspec.Struct, kw_only=True):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] | None = None


class ServerMetadata(msgspec.Struct, kw_only=True):
    name: str
    version: str
    extensions: list[str]


class ErrorBody(msgspec.Struct):
    error: str


_request_decoder = msgspec.json.Decoder(InferenceRequest)
_encoder = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def error_body(reason: str) -> bytes:
    return _encoder.encode(ErrorBody(reason))


# --------------------------------------------------------------------------- datatypes

_BY_KIND: dict[tuple[str, int], str] = {
    (dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"
}


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The OIP datatype of a numpy dtype; strings and objects are BYTES."""
    if dtype.kind in "OSU":
        return "BYTES"
    name = _BY_KIND.get((dtype.kind, dtype.itemsize))
    if name is None:
        raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
    return name


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A named tensor of a model's signature; -1 in `shape` is any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {list(self.shape)}"


# --------------------------------------------------------------------------- requests


def decode_request(body: bytes, header_length: int | None = None) -> tuple[InferenceRequest, memoryview | None]:
    """Parse a body (JSON, or JSON + binary tensors when `header_length` is given)."""
    binary: memoryview | None = None
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidRequest(f"Inference-Header-Content-Length {header_length} is outside the body "
                                 f"({len(body)} bytes)")
        binary = memoryview(body)[header_length:]
        body = body[:header_length]
    try:
        return _request_decoder.decode(body), binary
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"the body is not an inference request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply to be an inference request; send tensors as flat "
                             "`data` arrays with their `shape`") from None


class _Input:
    __slots__ = ("spec", "dtype", "rank", "fixed")

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        self.dtype = DATATYPES[spec.datatype]
        self.rank = len(spec.shape)
        self.fixed = tuple((i, d) for i, d in enumerate(spec.shape) if d >= 0)


class TensorCodec:
    """One model's request decoding and response encoding, precomputed from its signature."""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        for spec in (*inputs, *outputs):
            if spec.datatype not in DATATYPES:
                raise ValueError(f"tensor {spec.name!r} has unknown datatype {spec.datatype!r}")
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._inputs = {s.name: _Input(s) for s in inputs}
        self._expected = ", ".join(s.describe() for s in inputs)
        self._output_names = frozenset(s.name for s in outputs)

    def decode_inputs(self, req: InferenceRequest, binary: memoryview | None = None) -> dict[str, np.ndarray]:
        """The request's tensors as arrays, checked against the signature; InvalidRequest says what is wrong."""
        out: dict[str, np.ndarray] = {}
        offset = 0
        for t in req.inputs:
            spec = self._inputs.get(t.name)
            if spec is None:
                raise InvalidRequest(f"unknown input {t.name!r}; the model takes: {self._expected}")
            if t.name in out:
                raise InvalidRequest(f"input {t.name!r} is given twice")
            if t.datatype != spec.spec.datatype:
                if t.datatype not in DATATYPES:
                    raise InvalidRequest(f"input {t.name!r}: {t.datatype!r} is not an Open Inference Protocol "
                                         f"datatype ({', '.join(DATATYPES)})")
                raise InvalidRequest(f"input {t.name!r} has datatype {t.datatype}; the model takes "
                                     f"{spec.spec.describe()}")
            shape = t.shape
            if len(shape) != spec.rank or any(shape[i] != d for i, d in spec.fixed) or any(d < 0 for d in shape):
                raise InvalidRequest(f"input {t.name!r} has shape {shape}; the model takes {spec.spec.describe()}")
            size = math.prod(shape)
            if size == 0:  # the model libraries refuse an empty batch (a 500 from inside the model): say it here
                raise InvalidRequest(f"input {t.name!r} has shape {shape}, no elements to predict on; send at least "
                                     "one row")
            size_param = t.parameters.get("binary_data_size") if t.parameters else None
            if size_param is not None:
                arr, offset = _from_binary(t.name, binary, offset, size_param, spec.dtype, size)
            else:
                arr = _from_json(t.name, t.data, spec.dtype, size)
            out[t.name] = arr.reshape(shape)
        if len(out) != len(self._inputs):
            missing = [n for n in self._inputs if n not in out]
            raise InvalidRequest(f"missing input {', '.join(map(repr, missing))}; the model takes: {self._expected}")
        return out

    def check_requested(self, req: InferenceRequest) -> None:
        if req.outputs:
            for o in req.outputs:
                if o.name not in self._output_names:
                    raise InvalidRequest(f"unknown output {o.name!r}; the model returns: "
                                         f"{', '.join(sorted(self._output_names))}")

    def metadata(self, name: str, versions: list[str] | None, platform: str) -> ModelMetadata:
        return ModelMetadata(
            name=name, versions=versions, platform=platform,
            inputs=[MetadataTensor(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in self.inputs],
            outputs=[MetadataTensor(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in self.outputs],
        )


def _from_json(name: str, data: Any, dtype: np.dtype[Any], size: int) -> np.ndarray:
    if data is None:
        raise InvalidRequest(f"input {name!r} has no data")
    try:
        if dtype.kind == "f" and dtype.itemsize < 8:
            with np.errstate(over="ignore"):  # an overflow is a 400 below, not a warning in the node's log
                arr = np.asarray(data, dtype=dtype)
        else:
            arr = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequest(f"input {name!r}: data does not fit its datatype: {exc}") from None
    except RecursionError:
        raise InvalidRequest(f"input {name!r}: data is nested too deeply; send it flat with its shape") from None
    if dtype.kind == "f" and dtype.itemsize < 8 and arr.size and not np.isfinite(arr).all():
        _check_overflow(name, data, arr, dtype)
    if arr.size != size:
        raise InvalidRequest(f"input {name!r} has {arr.size} elements; its shape needs {size}")
    if dtype.kind == "O" and arr.size and not all(isinstance(x, (str, bytes)) for x in arr.flat):
        raise InvalidRequest(f"input {name!r}: BYTES data must be strings")
    return arr


_NONFINITE_TEXT = ("NaN", "Infinity", "-Infinity")


def _check_overflow(name: str, data: Any, arr: np.ndarray, dtype: np.dtype[Any]) -> None:
    """A non-finite value in a narrow float input must have been sent as "NaN"/"Infinity"/"-Infinity"."""
    try:
        src = np.asarray(data, dtype=object).ravel()
    except (ValueError, TypeError):  # ragged: the size check names it
        return
    for i in np.flatnonzero(~np.isfinite(arr.ravel())):
        if i < len(src) and not isinstance(src[i], str):
            raise InvalidRequest(f"input {name!r}: {src[i]!r} is out of range for {datatype_of(dtype)} "
                                 f"(largest: {float(np.finfo(dtype).max):.4g}); send a value in range, or "
                                 '"NaN"/"Infinity"/"-Infinity" as strings')


def _from_binary(name: str, binary: memoryview | None, offset: int, nbytes: Any, dtype: np.dtype[Any],
                 size: int) -> tuple[np.ndarray, int]:
    if binary is None:
        raise InvalidRequest(f"input {name!r} declares binary_data_size but the request has no "
                             "Inference-Header-Content-Length header")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0 or offset + nbytes > len(binary):
        raise InvalidRequest(f"input {name!r}: binary_data_size {nbytes!r} is outside the binary part")
    chunk = binary[offset:offset + nbytes]
    if dtype.kind == "O":
        arr = _bytes_elements(name, chunk)
    else:
        if nbytes != size * dtype.itemsize:
            raise InvalidRequest(f"input {name!r}: {nbytes} bytes do not hold {size} {dtype} elements")
        arr = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"))
    if arr.size != size:
        raise InvalidRequest(f"input {name!r} has {arr.size} elements; its shape needs {size}")
    return arr, offset + nbytes


def _bytes_elements(name: str, chunk: memoryview) -> np.ndarray:
    items: list[bytes] = []
    i = 0
    while i < len(chunk):
        if i + 4 > len(chunk):
            raise InvalidRequest(f"input {name!r}: truncated BYTES element")
        n = int.from_bytes(chunk[i:i + 4], "little")
        if i + 4 + n > len(chunk):  # a length past the chunk would be cut short silently, not refused
            raise InvalidRequest(f"input {name!r}: a BYTES element declares {n} bytes, past the end of its "
                                 f"binary_data_size ({len(chunk) - i - 4} left)")
        items.append(bytes(chunk[i + 4:i + 4 + n]))
        i += 4 + n
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


# --------------------------------------------------------------------------- responses


def _wants_binary(req: InferenceRequest) -> tuple[bool, frozenset[str]]:
    """(all outputs binary?, names of outputs asked for in binary)."""
    all_binary = bool(req.parameters and req.parameters.get("binary_data_output"))
    names = frozenset(o.name for o in req.outputs or () if o.parameters and o.parameters.get("binary_data"))
    return all_binary, names


def _min_json_bytes(arr: np.ndarray) -> int:
    """The fewest bytes `arr` takes as a JSON `data` array (every number at least "0,", a string '"",')."""
    return int(arr.size) * (5 if arr.dtype.kind == "b" else 3 if arr.dtype.kind in "OSU" else 2)


def encode_response(outputs: Mapping[str, np.ndarray], req: InferenceRequest, model_name: str,
                    model_version: str, max_bytes: int | None = None) -> tuple[bytes, int | None]:
    """-> (body, JSON header length when the body carries binary tensors, else None).

    `max_bytes`: a response larger than this raises ResponseTooLarge, found before the JSON is
    built when its smallest possible size is already over.
    """
    wanted = {o.name for o in req.outputs} if req.outputs else None
    all_binary, binary_names = _wants_binary(req) if (req.parameters or req.outputs) else (False, frozenset())
    selected = [(name, np.asarray(arr)) for name, arr in outputs.items() if wanted is None or name in wanted]
    if max_bytes is not None:
        floor = sum(arr.nbytes if (all_binary or name in binary_names) else _min_json_bytes(arr)
                    for name, arr in selected)
        if floor > max_bytes:
            raise _too_large(floor, max_bytes, at_least=True)
    body, blobs = _encode(selected, req, model_name, model_version, all_binary, binary_names, finite=True)
    if b"null" in body:  # a non-finite float became null: write it as the protocol's JSON mapping does
        body, blobs = _encode(selected, req, model_name, model_version, all_binary, binary_names, finite=False)
    size = len(body) + sum(len(b) for b in blobs)
    if max_bytes is not None and size > max_bytes:
        raise _too_large(size, max_bytes, at_least=False)
    if not blobs:
        return body, None
    return body + b"".join(blobs), len(body)


def _too_large(size: int, max_bytes: int, *, at_least: bool) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"the response would be {'at least ' if at_least else ''}{size} bytes, over the node's limit of "
        f"{max_bytes} (MODELCD_MAX_RESPONSE_BYTES): send fewer rows per request, ask only for the outputs you "
        "need (`outputs`), or ask for binary outputs (`binary_data_output`)")


def _encode(selected: list[tuple[str, np.ndarray]], req: InferenceRequest, model_name: str, model_version: str,
            all_binary: bool, binary_names: frozenset[str], *, finite: bool) -> tuple[bytes, list[bytes]]:
    tensors: list[ResponseOutput] = []
    blobs: list[bytes] = []
    for name, arr in selected:
        datatype = datatype_of(arr.dtype)
        if all_binary or name in binary_names:
            blob = _to_binary(arr, datatype)
            blobs.append(blob)
            tensors.append(ResponseOutput(name=name, shape=list(arr.shape), datatype=datatype,
                                          parameters={"binary_data_size": len(blob)}))
        else:
            tensors.append(ResponseOutput(name=name, shape=list(arr.shape), datatype=datatype,
                                          data=json_data(arr, datatype, finite=finite)))
    body = _encoder.encode(InferenceResponse(model_name=model_name, model_version=model_version, id=req.id,
                                             outputs=tensors))
    return body, blobs


def json_data(arr: np.ndarray, datatype: str, *, finite: bool = False) -> list[Any]:
    """A tensor's flat JSON `data`; non-finite floats as "NaN"/"Infinity"/"-Infinity" (`finite`: skip the check)."""
    flat = arr.ravel()
    data = flat.tolist()
    if datatype == "BYTES":
        return [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in data]
    if not finite and flat.dtype.kind == "f" and flat.size:
        for i in np.flatnonzero(~np.isfinite(flat)):
            v = data[i]
            data[i] = _NONFINITE_TEXT[0] if v != v else _NONFINITE_TEXT[1] if v > 0 else _NONFINITE_TEXT[2]
    return data


def _to_binary(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for x in arr.ravel():
            b = x if isinstance(x, bytes) else str(x).encode()
            parts.append(len(b).to_bytes(4, "little") + b)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def tensors_to_log(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A JSON-ready copy of tensors for a PredictionLog (only for sampled requests)."""
    out: dict[str, Any] = {}
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        try:
            datatype = datatype_of(arr.dtype)
        except ValueError:
            datatype = str(arr.dtype)
        out[name] = {"datatype": datatype, "shape": list(arr.shape),
                     "data": json_data(arr, "BYTES" if datatype == "BYTES" else datatype)}
    return out
