"""The model package: one content-addressed archive holding a model, its manifest and its sample data.

Layout of an archive (a POSIX ustar tar, optionally gzip-compressed)::

    manifest.json        the `Manifest` (msgspec JSON); always the first member
    <model_file>         the model in its flavor's safe format (skops, ONNX, XGBoost JSON, LightGBM text)
    samples.json         {"inputs": {name: nested list}, "outputs": {name: nested list}}, batch first
    ...                  anything else the manifest lists (e.g. a compiled model and its fallback)

Invariants:

- Deterministic: members other than the manifest are sorted by name, every header has mtime 0, uid/gid 0, empty
  owner names and mode 0644, and gzip is written with mtime 0, so the same model built twice is byte-identical.
  The package id is the sha256 hex of the archive bytes (`BuiltPackage.sha256`, `Package.sha256`).
- Closed: `Manifest.files` names every member except manifest.json with its sha256; a reader rejects a member the
  manifest does not list, a listed file that is missing, and a checksum mismatch.
- Defensive reading: `read_package` never extracts; it checks each header (name, type, size, count) before reading
  the member's content with a bounded read, bounds gzip decompression (in size, in ratio to the compressed size,
  and in time when given a deadline), and accepts only regular files with plain relative names (no absolute
  paths, no `..`, no links or devices, no duplicates). manifest.json is at most `MAX_MANIFEST_BYTES`; JSON nested
  too deeply is a `PackageError`, never a RecursionError. `peek_manifest` reads the first member only, in
  bounded work whatever the archive's size.
- Bounded values: `expiry_seconds` is at most `MAX_EXPIRY_SECONDS` (100 years: seconds, milliseconds and
  nanoseconds of it fit in an int64); expected outputs are finite unless the manifest sets `allow_nonfinite`.
- Every rejection is a `PackageError` whose message names the problem and, where there is one, the member.

This module is pure: no asyncio, no model library, and no I/O beyond bytes and the paths handed to it (a
`deadline` is a `time.monotonic()` value the caller hands in). Building a
package from a model object (which needs the model's own runtime) is `modelcd.runtimes.build`; this module only
assembles and reads archives.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, NamedTuple, get_args

import msgspec
import numpy as np
import numpy.typing as npt

from modelcd import units

__all__ = [
    "DATATYPES",
    "FLAVORS",
    "MANIFEST_NAME",
    "RUNTIMES",
    "BuiltPackage",
    "Flavor",
    "Manifest",
    "Package",
    "PackageError",
    "Samples",
    "TensorSpec",
    "assemble_package",
    "datatype_of",
    "decode_samples",
    "encode_samples",
    "extract_package",
    "numpy_dtype",
    "parse_duration",
    "peek_manifest",
    "read_package",
]


class PackageError(ValueError):
    """A package that cannot be built or must not be accepted; `reason` says what is wrong and where."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------------
# Manifest

Flavor = Literal["sklearn", "onnx", "xgboost", "lightgbm"]
FLAVORS: Final[tuple[str, ...]] = get_args(Flavor)
#: Runtimes a manifest may name; today one per flavor (a compiled sklearn model runs on "onnx").
RUNTIMES: Final[tuple[str, ...]] = FLAVORS
MANIFEST_NAME: Final = "manifest.json"
FORMAT_VERSION: Final = 1

#: Open Inference Protocol datatype -> numpy dtype. BYTES holds str (or bytes) objects.
DATATYPES: Final[Mapping[str, np.dtype[Any]]] = MappingProxyType({
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
})

# `\Z`, not `$`: `$` also matches before a trailing newline, so "iris\n" passed as a model name.
_NAME_RE: Final = r"^[a-z0-9][a-z0-9._-]{0,62}\Z"
_VERSION_RE: Final = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,62}\Z"
# Member names: relative, '/'-separated, ASCII, short enough for a plain ustar header (no PAX records).
_MEMBER_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*\Z")
_MEMBER_MAX_LEN: Final = 100
_SHA256_RE: Final = r"^[0-9a-f]{64}\Z"


def is_model_ref(name: str, version: str) -> bool:
    """Whether a package could name this model and version (no deployed model has any other name)."""
    return re.match(_NAME_RE, name) is not None and re.match(_VERSION_RE, version) is not None
#: The longest expiry period: 100 years. Its seconds, milliseconds and nanoseconds all fit in an int64, so
#: no reader (the retirement processor's timers, a JSON encoder, a datetime) overflows on it.
MAX_EXPIRY_SECONDS: Final = 100 * 365 * 86400
#: The largest manifest.json: signatures and labels, never data (samples live in their own file).
MAX_MANIFEST_BYTES: Final = 1 << 20

ModelName = Annotated[str, msgspec.Meta(pattern=_NAME_RE, description="lowercase model name")]
ModelVersion = Annotated[str, msgspec.Meta(pattern=_VERSION_RE, description="model version")]
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64", "BYTES"]


class TensorSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One named tensor of a signature; `shape` uses -1 for the batch (and any variable) dimension."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    datatype: Datatype
    shape: list[int]

    def __post_init__(self) -> None:
        if any(d < -1 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: shape {self.shape} has a dimension below -1")


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """manifest.json. Unknown fields are ignored on read, so later versions may add fields with defaults."""

    format_version: int = FORMAT_VERSION
    name: ModelName
    version: ModelVersion
    flavor: Flavor
    runtime: str  # the runtime that serves `model_file`; equals `flavor` unless compiled (e.g. "onnx")
    model_file: str
    fallback_runtime: str | None = None
    fallback_model_file: str | None = None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    owner: Annotated[str, msgspec.Meta(min_length=1)]
    expiry_seconds: Annotated[int, msgspec.Meta(gt=0, le=MAX_EXPIRY_SECONDS)]
    samples_file: str = "samples.json"
    tolerance: Annotated[float, msgspec.Meta(ge=0)] = 1e-5
    # The model may legitimately return NaN or infinity (its expected outputs may hold them; JSON writes them as
    # the literals NaN / Infinity). Off: a non-finite expected output is refused, and so is a model producing one
    # on its samples.
    allow_nonfinite: bool = False
    description: str = ""
    labels: dict[str, str] = {}
    files: dict[str, Annotated[str, msgspec.Meta(pattern=_SHA256_RE)]]

    def __post_init__(self) -> None:
        # Raised as ValueError here; msgspec turns it into a ValidationError when decoding.
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {self.format_version} (this reader knows {FORMAT_VERSION})")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r} (known: {', '.join(RUNTIMES)})")
        if (self.fallback_runtime is None) != (self.fallback_model_file is None):
            raise ValueError("fallback_runtime and fallback_model_file must be given together")
        if self.fallback_runtime is not None and self.fallback_runtime not in RUNTIMES:
            raise ValueError(f"unknown fallback_runtime {self.fallback_runtime!r} (known: {', '.join(RUNTIMES)})")
        for path in self.files:
            _check_member_name(path)
            if path == MANIFEST_NAME:
                raise ValueError(f"files must not list {MANIFEST_NAME}")
        for field, path in (("model_file", self.model_file), ("samples_file", self.samples_file),
                            ("fallback_model_file", self.fallback_model_file)):
            if path is not None and path not in self.files:
                raise ValueError(f"{field} {path!r} is not listed in files")
        if not self.inputs:
            raise ValueError("inputs must name at least one tensor")
        for what, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"{what} has duplicate tensor names: {names}")


_manifest_encoder: Final = msgspec.json.Encoder(order="deterministic")


def _check_member_name(path: str) -> None:
    if len(path) > _MEMBER_MAX_LEN or not _MEMBER_RE.match(path):
        raise ValueError(f"unsafe file name {path!r} (relative, '/'-separated [A-Za-z0-9._-], "
                         f"at most {_MEMBER_MAX_LEN} characters)")


def decode_manifest(data: bytes) -> Manifest:
    """Decode and validate manifest.json; raises `PackageError` naming the bad or missing field."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise PackageError(f"{MANIFEST_NAME} is {len(data)} bytes, the limit is {MAX_MANIFEST_BYTES}: a manifest "
                           "holds the signature and labels; sample data belongs in the samples file")
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise PackageError(f"invalid {MANIFEST_NAME}: not JSON ({exc})") from None
    except RecursionError:
        raise PackageError(f"invalid {MANIFEST_NAME}: JSON nested too deeply") from None
    if not isinstance(raw, dict):
        raise PackageError(f"invalid {MANIFEST_NAME}: expected an object, got {type(raw).__name__}")
    expiry = raw.get("expiry_seconds")
    if isinstance(expiry, int | float) and not isinstance(expiry, bool) and expiry > MAX_EXPIRY_SECONDS:
        raise PackageError(f"invalid {MANIFEST_NAME}: expiry_seconds {expiry:g} is longer than the longest expiry "
                           f"of 100 years ({MAX_EXPIRY_SECONDS} s)")
    flavor = raw.get("flavor")
    if isinstance(flavor, str) and flavor not in FLAVORS:
        raise PackageError(f"invalid {MANIFEST_NAME}: unknown flavor {flavor!r} (supported: {', '.join(FLAVORS)})")
    try:
        return msgspec.convert(raw, Manifest)
    except msgspec.ValidationError as exc:
        raise PackageError(f"invalid {MANIFEST_NAME}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Samples and datatypes


class Samples(NamedTuple):
    """Sample inputs and the outputs the model must produce for them, batch first, typed by the signature."""

    inputs: dict[str, npt.NDArray[Any]]
    outputs: dict[str, npt.NDArray[Any]]


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an Open Inference Protocol datatype name ("FP32" -> float32)."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise PackageError(f"unknown datatype {datatype!r} (known: {', '.join(DATATYPES)})") from None


def datatype_of(dtype: npt.DTypeLike) -> str:
    """The Open Inference Protocol datatype name of a numpy dtype (str/bytes/object -> "BYTES")."""
    dt = np.dtype(dtype)
    if dt.kind in "OUS":
        return "BYTES"
    for name, candidate in DATATYPES.items():
        if candidate == dt:
            return name
    raise PackageError(f"no Open Inference Protocol datatype for numpy dtype {dt}")


def _as_array(value: Any, datatype: str | None = None) -> npt.NDArray[Any]:
    if datatype is None:
        arr = np.asarray(value)
        return arr.astype(object) if arr.dtype.kind in "US" else arr
    dt = numpy_dtype(datatype)
    if dt.kind == "O":
        return np.asarray(value, dtype=object)
    return np.asarray(value, dtype=dt)


def _to_jsonable(arr: npt.NDArray[Any]) -> Any:
    if arr.dtype.kind == "O":
        return [_to_jsonable(a) for a in arr] if arr.ndim else (
            arr.item().decode() if isinstance(arr.item(), bytes) else arr.item())
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise PackageError("sample data must be finite (JSON has no NaN or infinity)")
    return arr.tolist()


def encode_samples(inputs: Mapping[str, npt.NDArray[Any]], outputs: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """samples.json bytes, deterministic (sorted keys). Float values round-trip exactly."""
    doc = {"inputs": {k: _to_jsonable(np.asarray(v)) for k, v in inputs.items()},
           "outputs": {k: _to_jsonable(np.asarray(v)) for k, v in outputs.items()}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def decode_samples(data: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                   *, where: str = "samples.json", allow_nonfinite: bool = True) -> Samples:
    """Parse samples.json into arrays typed by the signature; every tensor must be there with one batch size.

    With `allow_nonfinite=False` an expected output holding NaN or infinity is refused (`read_package` passes
    the manifest's `allow_nonfinite`).
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PackageError(f"{where}: not JSON ({exc})") from None
    except RecursionError:
        raise PackageError(f"{where}: JSON nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict) or not isinstance(
            doc.get("outputs"), dict):
        raise PackageError(f'{where}: expected {{"inputs": {{...}}, "outputs": {{...}}}}')
    result: list[dict[str, npt.NDArray[Any]]] = []
    batch: int | None = None
    for section, specs in (("inputs", inputs), ("outputs", outputs)):
        arrays: dict[str, npt.NDArray[Any]] = {}
        for spec in specs:
            if spec.name not in doc[section]:
                raise PackageError(f"{where}: {section} has no tensor {spec.name!r}")
            try:
                arr = _as_array(doc[section][spec.name], spec.datatype)
            except (ValueError, TypeError) as exc:
                raise PackageError(f"{where}: {section}.{spec.name} is not a {spec.datatype} tensor ({exc})") from None
            if not _shape_fits(arr.shape, spec.shape):
                raise PackageError(f"{where}: {section}.{spec.name} has shape {list(arr.shape)}, "
                                   f"the signature says {spec.shape}")
            if batch is None:
                batch = arr.shape[0] if arr.ndim else 0
            if not arr.ndim or arr.shape[0] != batch or batch == 0:
                raise PackageError(f"{where}: {section}.{spec.name} must hold the same non-empty batch "
                                   f"({batch}) as the other tensors")
            if section == "outputs" and not allow_nonfinite and arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                raise PackageError(f"{where}: outputs.{spec.name} holds NaN or infinity; expected outputs must be "
                                   "finite unless the manifest sets allow_nonfinite: true (the model may return them)")
            arrays[spec.name] = arr
        result.append(arrays)
    return Samples(result[0], result[1])


def _shape_fits(actual: Sequence[int], declared: Sequence[int]) -> bool:
    return len(actual) == len(declared) and all(d == -1 or d == a for a, d in zip(actual, declared, strict=True))


def _infer_specs(arrays: Mapping[str, npt.NDArray[Any]]) -> list[TensorSpec]:
    return [TensorSpec(name=name, datatype=datatype_of(arr.dtype), shape=[-1, *arr.shape[1:]])  # type: ignore[arg-type]
            for name, arr in arrays.items()]


# ---------------------------------------------------------------------------------------------------------------
# Durations


def parse_duration(value: str | int) -> int:
    """Whole seconds in a positive duration: an int, "3600", "90m", "12h", "30d", "2w", "1d12h" (modelcd.units)."""
    hint = "use seconds or a number with a unit s, m, h, d or w, e.g. '30d', '12h', '1d12h'"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PackageError(f"invalid duration {value!r}: {hint}")
    try:
        seconds = units.parse_duration(value, positive=True)
    except units.UnitError:
        raise PackageError(f"invalid duration {value!r}: must be a positive duration; {hint}") from None
    if seconds < 1 or not seconds.is_integer():
        raise PackageError(f"invalid duration {value!r}: must be a whole number of seconds; {hint}")
    if seconds > MAX_EXPIRY_SECONDS:
        raise PackageError(f"invalid duration {value!r}: longer than 100 years ({MAX_EXPIRY_SECONDS} s)")
    return int(seconds)


# ---------------------------------------------------------------------------------------------------------------
# Writing archives


@dataclass(frozen=True, slots=True)
class BuiltPackage:
    """A package archive as bytes, its id (sha256 hex of `data`) and its manifest."""

    data: bytes
    sha256: str
    manifest: Manifest


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


def assemble_package(manifest: Manifest, contents: Mapping[str, bytes], *, compress: bool = False) -> BuiltPackage:
    """Write the deterministic archive for `contents` (path -> bytes, manifest.json excluded).

    `manifest.files` is recomputed from `contents`, so pass any value there (e.g. `{}` via `msgspec.structs.replace`).
    Raises `PackageError` if the manifest does not validate against the contents.
    """
    if MANIFEST_NAME in contents:
        raise PackageError(f"contents must not include {MANIFEST_NAME}; it is written from the manifest")
    files = {path: hashlib.sha256(contents[path]).hexdigest() for path in sorted(contents)}
    try:
        manifest = msgspec.structs.replace(manifest, files=files)
    except (ValueError, TypeError) as exc:
        raise PackageError(f"invalid manifest: {exc}") from None
    manifest_bytes = _manifest_encoder.encode(manifest)
    decode_manifest(manifest_bytes)  # the struct constructor skips field constraints (patterns, gt); decoding checks
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in [(MANIFEST_NAME, manifest_bytes), *((p, contents[p]) for p in files)]:
            tf.addfile(*_tar_member(name, data))
    data = buf.getvalue()
    if compress:
        data = gzip.compress(data, compresslevel=9, mtime=0)
    return BuiltPackage(data=data, sha256=hashlib.sha256(data).hexdigest(), manifest=manifest)


# ---------------------------------------------------------------------------------------------------------------
# Reading archives


DEFAULT_MAX_MEMBER_BYTES: Final = 1 << 30  # 1 GiB
DEFAULT_MAX_TOTAL_BYTES: Final = 2 << 30  # 2 GiB
DEFAULT_MAX_MEMBERS: Final = 64


@dataclass(frozen=True)
class Package:
    """A validated package: its manifest, its files' bytes (manifest.json excluded) and its id."""

    manifest: Manifest
    contents: Mapping[str, bytes]
    sha256: str  # the package id: sha256 hex of `data`
    data: bytes  # the archive as given (gzip or not)
    manifest_json: bytes  # manifest.json exactly as stored

    def read(self, path: str) -> bytes:
        """The bytes of one file the manifest lists."""
        try:
            return self.contents[path]
        except KeyError:
            raise PackageError(f"package has no file {path!r}") from None

    @property
    def model_bytes(self) -> bytes:
        return self.contents[self.manifest.model_file]

    def samples(self) -> Samples:
        """The sample inputs and expected outputs as numpy arrays typed by the signature (fresh arrays each call)."""
        m = self.manifest
        return decode_samples(self.contents[m.samples_file], m.inputs, m.outputs, where=m.samples_file,
                              allow_nonfinite=m.allow_nonfinite)

    def built(self) -> BuiltPackage:
        return BuiltPackage(data=self.data, sha256=self.sha256, manifest=self.manifest)


#: Below this unpacked size the ratio limit does not apply: a small package of zeros compresses very well.
RATIO_FLOOR_BYTES: Final = 64 << 20


def _past(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise PackageError(f"reading the package took too long ({what}); MODELCD_PACKAGE_READ_TIMEOUT bounds it")


class _Gunzip:
    """A read-only stream of a gzip member's decompressed bytes, decompressed only as far as it is read, and
    never past `limit` bytes or `deadline`. `finish()` reads to the end and checks the stream is whole."""

    def __init__(self, data: bytes, limit: int, deadline: float | None) -> None:
        self._d = zlib.decompressobj(wbits=31)
        self._pending = data
        self._buf = b""
        self._out = 0
        self._limit = limit
        self._deadline = deadline

    def read(self, n: int = -1) -> bytes:
        want = self._limit + 1 if n is None or n < 0 else n
        parts = [self._buf]
        have = len(self._buf)
        while have < want and not self._d.eof:
            try:
                chunk = self._d.decompress(self._pending, max(want - have, 1 << 16))
            except zlib.error as exc:
                raise PackageError(f"corrupt gzip stream: {exc}") from None
            self._pending = self._d.unconsumed_tail
            if not chunk and not self._pending and not self._d.eof:
                raise PackageError("corrupt gzip stream: truncated")
            self._out += len(chunk)
            if self._out > self._limit:
                raise PackageError(f"archive too large: decompresses to more than {self._limit} bytes")
            parts.append(chunk)
            have += len(chunk)
            _past(self._deadline, "gunzip")
        data = b"".join(parts)
        self._buf = data[want:]
        return data[:want]

    def finish(self) -> None:
        while not self._d.eof:
            if not self.read(1 << 20) and not self._d.eof:
                raise PackageError("corrupt gzip stream: truncated")
        if self._d.unused_data:
            raise PackageError("corrupt gzip stream: trailing data after the compressed archive")


def _member_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"symlink to {info.linkname!r}"
    if info.islnk():
        return f"hard link to {info.linkname!r}"
    if info.isdir():
        return "directory"
    if info.ischr() or info.isblk():
        return "device"
    if info.isfifo():
        return "fifo"
    return f"type {info.type!r}"


def read_package(data: bytes, *, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES, max_members: int = DEFAULT_MAX_MEMBERS,
                 max_ratio: float | None = None, deadline: float | None = None) -> Package:
    """Check an untrusted archive and return its `Package`, or raise `PackageError` naming the first problem.

    Checks, in order: tar (or gzip tar) at all, gunzip bounded by `max_total_bytes`, `max_ratio` and
    `deadline`; for each member, before reading it: count, name (no absolute path, no `..`, plain relative
    name), type (regular files only), duplicates, size (manifest.json: `MAX_MANIFEST_BYTES`) and running total;
    then the manifest (present, valid), the file set against `manifest.files` (missing, unlisted), checksums,
    and that the samples file decodes against the signature. Past `deadline` (a `time.monotonic()` value),
    between steps, it stops with a `PackageError`.
    """
    archive = data
    gunzip: _Gunzip | None = None
    budget, by_ratio = max_total_bytes, False
    try:
        if data[:2] == b"\x1f\x8b":
            if max_ratio is not None and (cap := max(RATIO_FLOOR_BYTES, int(max_ratio * len(data)))) < budget:
                budget, by_ratio = cap, True
            # Streamed: each header is checked before its content is decompressed, so a bomb declaring a
            # huge member is refused at its header; tar headers and padding take at most 3 KiB per member
            # (header, PAX record, last block) plus the end blocks.
            gunzip = _Gunzip(data, budget + 3072 * (max_members + 1) + 10240, deadline)
            tf = tarfile.open(fileobj=gunzip, mode="r|", bufsize=1 << 20)  # type: ignore[call-overload]
        else:
            tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except (tarfile.TarError, EOFError) as exc:
        raise PackageError(f"not a tar archive: {exc}") from None
    contents: dict[str, bytes] = {}
    total = 0
    count = 0
    try:
        with tf:
            while (info := tf.next()) is not None:
                # `tar cf pkg.tar -C dir .` writes the directory itself as "." or "./" and every file as
                # "./name": the root is skipped and the prefix dropped; every check below still applies.
                if info.isdir() and info.name in (".", "./"):
                    continue
                name = info.name[2:] if info.name.startswith("./") and len(info.name) > 2 else info.name
                count += 1
                if count > max_members:
                    raise PackageError(f"too many members: more than {max_members}")
                if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
                    raise PackageError(f"member {name!r}: absolute path")
                if ".." in re.split(r"[/\\]", name):
                    raise PackageError(f"member {name!r}: path has a '..' component")
                if not info.isreg():
                    hint = (" (a package holds files only: archive them by name, e.g. `tar cf pkg.tar -C dir "
                            "manifest.json model.onnx samples.json`, or use `modelcd package build`)"
                            if info.isdir() else "")
                    raise PackageError(f"member {name!r}: not a regular file ({_member_kind(info)}){hint}")
                try:
                    _check_member_name(name)
                except ValueError as exc:
                    raise PackageError(f"member {name!r}: {exc}") from None
                if name in contents:
                    raise PackageError(f"member {name!r}: duplicate member")
                if info.size > max_member_bytes:
                    raise PackageError(f"member {name!r}: oversized, archive too large ({info.size} bytes, "
                                       f"limit {max_member_bytes})")
                if name == MANIFEST_NAME and info.size > MAX_MANIFEST_BYTES:
                    raise PackageError(f"member {name!r}: oversized ({info.size} bytes, limit {MAX_MANIFEST_BYTES}): "
                                       "a manifest holds the signature and labels; sample data belongs in the "
                                       "samples file")
                total += info.size
                if total > budget:
                    raise PackageError(
                        f"archive too large: members exceed {max_ratio:g} times the {len(archive)} compressed bytes "
                        f"(at member {name!r}; MODELCD_MAX_PACKAGE_RATIO bounds gzip bombs)" if by_ratio else
                        f"archive too large: members exceed {max_total_bytes} bytes (at member {name!r})")
                fh = tf.extractfile(info)
                assert fh is not None  # a regular file always has a reader
                content = fh.read(info.size)
                if len(content) != info.size:
                    raise PackageError(f"member {name!r}: truncated ({len(content)} of {info.size} bytes)")
                contents[name] = content
                _past(deadline, "tar walk")
        if gunzip is not None:
            gunzip.finish()
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise PackageError(f"corrupt tar archive: {exc}") from None

    if MANIFEST_NAME not in contents:
        raise PackageError(f"missing {MANIFEST_NAME}")
    manifest_json = contents.pop(MANIFEST_NAME)
    manifest = decode_manifest(manifest_json)
    for path in sorted(manifest.files):
        if path not in contents:
            raise PackageError(f"member {path!r}: listed in the manifest but missing from the archive")
    for path in sorted(contents):
        if path not in manifest.files:
            raise PackageError(f"member {path!r}: present in the archive but not listed in the manifest")
    for path, expected in manifest.files.items():
        actual = hashlib.sha256(contents[path]).hexdigest()
        if actual != expected:
            raise PackageError(f"member {path!r}: checksum mismatch (manifest {expected}, content {actual})")
        _past(deadline, "checksums")
    decode_samples(contents[manifest.samples_file], manifest.inputs, manifest.outputs, where=manifest.samples_file,
                   allow_nonfinite=manifest.allow_nonfinite)
    return Package(manifest=manifest, contents=MappingProxyType(contents), sha256=hashlib.sha256(archive).hexdigest(),
                   data=archive, manifest_json=manifest_json)


def peek_manifest(data: bytes) -> bytes | None:
    """manifest.json's bytes if it is the archive's first member (as every package writes it), else None.

    Bounded work whatever the archive: at most one tar header and `MAX_MANIFEST_BYTES` are decompressed, so
    a caller may use it on an untrusted upload (e.g. to key a request by model name) before validation.
    """
    need = tarfile.BLOCKSIZE + MAX_MANIFEST_BYTES
    if data[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(wbits=31).decompress(data, need)
        except zlib.error:
            return None
    else:
        head = data[:need]
    try:
        info = tarfile.TarInfo.frombuf(head[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    except tarfile.TarError:
        return None
    if info.name != MANIFEST_NAME or not info.isreg() or info.size > MAX_MANIFEST_BYTES:
        return None
    body = head[tarfile.BLOCKSIZE:tarfile.BLOCKSIZE + info.size]
    return body if len(body) == info.size else None


def extract_package(data: bytes, dest_dir: str | Path, **limits: int) -> Package:
    """Validate with `read_package` (same limits), then write the files into `dest_dir` (absent or empty).

    manifest.json is written too. Nothing is written unless the whole archive is valid; files are created
    exclusively, so nothing already in `dest_dir` is followed or overwritten.
    """
    pkg = read_package(data, **limits)
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PackageError(f"cannot extract into {dest}: not an empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    for path, content in [(MANIFEST_NAME, pkg.manifest_json), *pkg.contents.items()]:
        target = (root / path).resolve()
        if not target.is_relative_to(root):  # cannot happen after read_package; kept as a second fence
            raise PackageError(f"member {path!r}: escapes {dest}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as fh:
            fh.write(content)
    return pkg
