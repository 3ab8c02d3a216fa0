"""Which shadow relations apply to a request: pure, no I/O, no clock (`now` is passed in).

Invariants:
- a relation applies to a request answered by primary `name:version` when its `primary`
  is `name` (any version) or exactly `name:version`, `start <= now < end` (no end: open),
  every criterion holds, and the request is sampled in;
- sampling is a deterministic function of (request id, rate, salt): the same request is
  shadowed the same way on every node and on every replay. The salt of a relation is its
  primary model's name, so every shadow of one primary sees the *same* sampled requests
  (their comparisons are then over the same traffic), and a 5 % shadow's requests are a
  subset of a 10 % one's;
- relations are compiled once per TrafficPolicy (`ShadowRules.update`), indexed by primary;
  the request path costs one dict lookup, the criteria's comparisons and one hash.

Criteria (`Criterion.field` is `header:<name>`, `param:<name>` or `input:<name>`):
- headers are compared case-insensitively by name, as text for eq/ne/in and as numbers for
  gt/ge/lt/le (a header that is not a number fails an order criterion);
- an input that is a list (a tensor's data, any nesting) holds only if *every* element holds,
  so a range criterion chooses requests entirely inside the range; an empty input never holds;
- a value of the wrong type for its operator (a string compared with `gt 3`) fails the
  criterion, it never raises;
- a missing field fails every operator (`ne` too) except `exists`, which holds when the field is
  present, whatever its value.

Prediction logging is combined with shadowing: a shadowed request's primary output travels in
its ShadowPrediction (that is what the comparison reads), so `log_primary` tells the node not to
log it a second time in `modelcd.predictions`.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelcd.events.schemas import Criterion, ShadowRelation, TrafficPolicy

_SCALE = 1.0 / float(1 << 64)


def sample(request_id: str, rate: float, salt: str = "") -> bool:
    """True for a deterministic `rate` share of request ids (blake2b of salt + id, uniform in [0, 1))."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(request_id.encode(), digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "little") * _SCALE < rate


def log_primary(request_id: str, log_rate: float, *, shadowed: bool) -> bool:
    """Whether the node logs a primary prediction to `modelcd.predictions`.

    A shadowed request's primary output is already published once, in its ShadowPrediction:
    it is not logged twice.
    """
    return not shadowed and sample(request_id, log_rate, "prediction-log")


@dataclass(frozen=True, slots=True)
class RequestView:
    """What criteria may look at: headers, parameters and inputs (name -> value, list, array or tensor).

    Headers are a mapping (any case) or ASGI's list of (lower-case name, value) byte pairs, left
    as they are so that a request no header criterion looks at costs nothing.
    """

    headers: Mapping[str, str] | Sequence[tuple[bytes, bytes]] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ShadowTarget:
    """One shadow to run for a request: the shadow's name and version, and the relation's endpoint."""

    model: str
    version: str
    endpoint: str
    relation: ShadowRelation


Predicate = Callable[[RequestView], bool]

_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le,
}
_MISSING = object()


class CriterionError(ValueError):
    """A criterion that cannot be compiled (unknown field kind or operator, bad `in` value)."""


def _flat(value: Any) -> Iterable[Any]:
    if hasattr(value, "tolist"):  # a numpy array (or scalar), as the node decodes inputs
        value = value.tolist()
    elif isinstance(value, Mapping):
        value = value.get("data", [])  # an Open Inference Protocol tensor as JSON
    elif hasattr(value, "data") and hasattr(value, "datatype"):  # a TensorData
        value = value.data
    if isinstance(value, list | tuple):
        for v in value:
            yield from _flat(v)
    else:
        yield value


def _identity(value: Any) -> Any:
    return value


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def compile_criterion(c: Criterion) -> Predicate:
    """A predicate over a RequestView; everything that can be decided once is decided here."""
    kind, sep, name = c.field.partition(":")
    if not sep or not name or kind not in {"header", "param", "input"}:
        raise CriterionError(f"criterion field {c.field!r}: expected header:<name>, param:<name> or input:<name>")
    op = c.op
    if kind == "header":
        hname = name.lower()

        hbytes = hname.encode("latin-1")

        def get(req: RequestView) -> Any:
            h = req.headers
            if isinstance(h, Mapping):
                v = h.get(hname, _MISSING)
                if v is _MISSING and h:  # headers given with their original case
                    v = next((val for k, val in h.items() if k.lower() == hname), _MISSING)
                return v
            for k, val in h:  # ASGI: [(lower-case name bytes, value bytes)], scanned only when a criterion asks
                if k == hbytes:
                    return val.decode("latin-1")
            return _MISSING
    elif kind == "param":
        def get(req: RequestView) -> Any:
            return req.params.get(name, _MISSING)
    else:
        def get(req: RequestView) -> Any:
            return req.inputs.get(name, _MISSING)

    if op == "exists":
        return lambda req: get(req) is not _MISSING

    test: Callable[[Any], bool]
    if op in {"eq", "ne", "in"}:
        if op == "in":
            if not isinstance(c.value, list | tuple | set | frozenset):
                raise CriterionError(f"criterion {c.field} in: the value must be a list, got {c.value!r}")
            allowed = frozenset(str(v) for v in c.value) if kind == "header" else list(c.value)
            test = allowed.__contains__
        else:
            want: Any = c.value
            if kind == "header":
                num = None if isinstance(want, bool) else _as_float(want)
                if num is not None and not isinstance(want, str):
                    want, conv = num, _as_float  # header "1.0" equals criterion 1
                else:
                    want, conv = (str(want).lower() if isinstance(want, bool) else str(want)), str
            else:
                conv = _identity
            if op == "eq":
                def test(v: Any) -> bool:
                    return conv(v) == want
            else:
                def test(v: Any) -> bool:
                    return conv(v) != want
    elif op in _ORDER:
        cmp = _ORDER[op]
        bound = _as_float(c.value)
        if bound is None:
            if not isinstance(c.value, str):
                raise CriterionError(f"criterion {c.field} {op}: the value must be a number or text, got {c.value!r}")
            text_bound = c.value

            def test(v: Any) -> bool:
                return isinstance(v, str) and cmp(v, text_bound)
        else:
            def test(v: Any) -> bool:
                f = _as_float(v)
                return f is not None and cmp(f, bound)
    else:
        raise CriterionError(f"criterion {c.field}: unknown operator {op!r}")

    if kind == "input":
        def pred(req: RequestView) -> bool:
            v = get(req)
            if v is _MISSING:
                return False
            seen = False
            for item in _flat(v):
                seen = True
                try:
                    if not test(item):
                        return False
                except TypeError:
                    return False
            return seen
        return pred

    def pred_scalar(req: RequestView) -> bool:
        v = get(req)
        if v is _MISSING:
            return False
        try:
            return bool(test(v))
        except TypeError:
            return False
    return pred_scalar


@dataclass(frozen=True, slots=True)
class CompiledRelation:
    relation: ShadowRelation
    endpoint: str
    target: ShadowTarget
    start: float
    end: float  # math.inf when open
    rate: float
    salt: str
    criteria: tuple[Predicate, ...]

    def applies(self, request_id: str, req: RequestView, now: float) -> bool:
        if not (self.start <= now < self.end):
            return False
        for pred in self.criteria:
            if not pred(req):
                return False
        return sample(request_id, self.rate, self.salt)


def split_ref(ref: str) -> tuple[str, str]:
    """'name:version' -> (name, version); 'name' -> (name, '')."""
    name, _, version = ref.partition(":")
    return name, version


def compile_relation(endpoint: str, rel: ShadowRelation) -> CompiledRelation:
    """Raises CriterionError (a ValueError) when the relation cannot be used."""
    name, version = split_ref(rel.shadow)
    if not name or not version:
        raise CriterionError(f"shadow {rel.shadow!r}: expected name:version")
    if not 0.0 <= rel.sample_rate <= 1.0:
        raise CriterionError(f"sample rate {rel.sample_rate}: expected a share between 0 and 1")
    return CompiledRelation(
        relation=rel,
        endpoint=endpoint,
        target=ShadowTarget(model=name, version=version, endpoint=endpoint, relation=rel),
        start=rel.start,
        end=math.inf if rel.end is None else rel.end,
        rate=rel.sample_rate,
        salt=split_ref(rel.primary)[0],
        criteria=tuple(compile_criterion(c) for c in rel.criteria),
    )


class ShadowRules:
    """Every shadow relation a node knows, from every endpoint's TrafficPolicy, indexed by primary.

    Relations are about models: one stored in endpoint E's policy applies to every request its
    primary answers, whichever endpoint routed it there. `update(policy)` replaces that
    endpoint's relations (a deleted policy removes them; an older policy than the one known, by
    (at, revision), is ignored) and returns the relations that could not be compiled, with the
    reason, so the node can report them instead of failing. `reconcile(policies, started)`
    applies a snapshot of the store: endpoints missing from it are dropped unless their policy
    arrived after the snapshot was started (the event is newer than the snapshot).
    """

    def __init__(self) -> None:
        self._by_endpoint: dict[str, tuple[CompiledRelation, ...]] = {}
        self._known: dict[str, tuple[float, int, float]] = {}  # endpoint -> (at, revision, received)
        self._index: dict[str, tuple[CompiledRelation, ...]] = {}

    def update(self, policy: TrafficPolicy, *, received: float = 0.0) -> list[tuple[ShadowRelation, str]]:
        known = self._known.get(policy.endpoint)
        if known is not None and (known[0], known[1]) > (policy.at, policy.revision):
            return []
        self._known[policy.endpoint] = (policy.at, policy.revision, received)
        rejected: list[tuple[ShadowRelation, str]] = []
        compiled: list[CompiledRelation] = []
        if not policy.deleted:
            for rel in policy.shadows:
                try:
                    compiled.append(compile_relation(policy.endpoint, rel))
                except CriterionError as exc:
                    rejected.append((rel, str(exc)))
        if compiled:
            self._by_endpoint[policy.endpoint] = tuple(compiled)
        else:
            self._by_endpoint.pop(policy.endpoint, None)
        self._reindex()
        return rejected

    def reconcile(self, policies: Iterable[TrafficPolicy], started: float) -> list[tuple[ShadowRelation, str]]:
        rejected: list[tuple[ShadowRelation, str]] = []
        seen = set()
        for p in policies:
            seen.add(p.endpoint)
            rejected += self.update(p, received=started)
        for endpoint in [e for e, k in self._known.items() if e not in seen and k[2] < started]:
            del self._known[endpoint]
            self._by_endpoint.pop(endpoint, None)
        self._reindex()
        return rejected

    def _reindex(self) -> None:
        index: dict[str, list[CompiledRelation]] = {}
        for rels in self._by_endpoint.values():
            for r in rels:
                index.setdefault(r.relation.primary, []).append(r)
        self._index = {k: tuple(v) for k, v in index.items()}

    def __bool__(self) -> bool:
        return bool(self._index)

    def relations(self) -> list[CompiledRelation]:
        return [r for rels in self._by_endpoint.values() for r in rels]

    def match(self, model: str, version: str, request_id: str, req: RequestView, now: float) -> list[ShadowTarget]:
        """The shadows to run for a request that primary `model:version` answered (deduplicated)."""
        index = self._index
        if not index:
            return []
        by_name = index.get(model, ())
        by_version = index.get(f"{model}:{version}", ()) if version else ()
        if not by_name and not by_version:
            return []
        out: list[ShadowTarget] = []
        seen: set[tuple[str, str]] = set()
        for rel in (*by_version, *by_name):
            t = rel.target
            if (t.model, t.version) in seen or (t.model == model and t.version == version):
                continue  # a model never shadows itself; one shadow runs once per request
            if rel.applies(request_id, req, now):
                seen.add((t.model, t.version))
                out.append(t)
        return out
