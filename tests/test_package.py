"""The package format: building, deterministic archives, defensive reading, runtimes per flavor, spec files."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import load_diabetes, load_iris
from sklearn.linear_model import LinearRegression, LogisticRegression

from modelcd.runtimes.build import build_from_spec, build_package
from modelcd.runtimes.flavors import InvalidInputError, MissingExtraError, ModelLoadError, load_runtime, outputs_match
from modelcd.store.package import BuiltPackage, PackageError, TensorSpec, extract_package, parse_duration, read_package

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
DIAB_X, DIAB_Y = load_diabetes(return_X_y=True)
IRIS_SAMPLES = IRIS_X[::15]  # 10 rows, all three classes
DIAB_SAMPLES = DIAB_X[:8]


@pytest.fixture(scope="module")
def iris_model() -> LogisticRegression:
    return LogisticRegression(max_iter=500).fit(IRIS_X, IRIS_Y)


@pytest.fixture(scope="module")
def built(iris_model: LogisticRegression) -> BuiltPackage:
    return build_package(iris_model, name="iris", version="1.0.0", owner="team-a", expiry="30d",
                         sample_inputs=IRIS_SAMPLES)


# --------------------------------------------------------------------------------------------------------------
# Hand-made archives


Member = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes, size: int | None = None) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def make_tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def members_of(pkg: BuiltPackage) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(pkg.data)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]


def with_manifest(pkg: BuiltPackage, edit: Callable[[dict], None]) -> dict[str, bytes]:
    files = members_of(pkg)
    manifest = json.loads(files["manifest.json"])
    edit(manifest)
    files["manifest.json"] = json.dumps(manifest).encode()
    return files


def tar_of(files: dict[str, bytes]) -> bytes:
    return make_tar([reg(n, d) for n, d in files.items()])


def rejects(data: bytes, *fragments: str, **limits: int) -> str:
    with pytest.raises(PackageError) as info:
        read_package(data, **limits)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert info.value.reason == message
    return message


# --------------------------------------------------------------------------------------------------------------
# Rejections, one per problem


def test_rejects_absolute_path(built: BuiltPackage) -> None:
    """A member with an absolute path is refused and named."""
    rejects(make_tar([*(reg(n, d) for n, d in members_of(built).items()), reg("/etc/passwd", b"x")]),
            "'/etc/passwd'", "absolute path")


def test_rejects_parent_component(built: BuiltPackage) -> None:
    """A member with a `..` component is refused and named."""
    rejects(make_tar([reg("../evil.sh", b"x"), *(reg(n, d) for n, d in members_of(built).items())]),
            "'../evil.sh'", "'..'")


@pytest.mark.parametrize(("member", "kind"), [
    (special("model.skops", tarfile.SYMTYPE, "/etc/passwd"), "symlink"),
    (special("model.skops", tarfile.LNKTYPE, "samples.json"), "hard link"),
    (special("dev", tarfile.CHRTYPE), "device"),
    (special("fifo", tarfile.FIFOTYPE), "fifo"),
    (special("dir", tarfile.DIRTYPE), "directory"),
])
def test_rejects_non_regular_members(built: BuiltPackage, member: Member, kind: str) -> None:
    """Links, devices, fifos and directories are refused, naming the member and its kind."""
    files = members_of(built)
    rejects(make_tar([reg("manifest.json", files["manifest.json"]), member]),
            f"'{member[0].name}'", "not a regular file", kind)


def test_rejects_duplicate_member(built: BuiltPackage) -> None:
    """A second member with the same name (which would shadow the first on extraction) is refused."""
    files = members_of(built)
    rejects(make_tar([*(reg(n, d) for n, d in files.items()), reg("model.skops", b"other")]),
            "'model.skops'", "duplicate")


def test_rejects_missing_manifest(built: BuiltPackage) -> None:
    """An archive without manifest.json is refused."""
    files = members_of(built)
    del files["manifest.json"]
    rejects(tar_of(files), "missing manifest.json")


def test_rejects_manifest_missing_field(built: BuiltPackage) -> None:
    """A manifest without a mandatory field is refused, naming the field (msgspec's validation message)."""
    rejects(tar_of(with_manifest(built, lambda m: m.pop("owner"))), "invalid manifest.json", "owner")


def test_rejects_manifest_bad_values(built: BuiltPackage) -> None:
    """Constraint violations (non-positive expiry, bad model name, invalid JSON) are refused and named."""
    rejects(tar_of(with_manifest(built, lambda m: m.update(expiry_seconds=0))), "expiry_seconds")
    rejects(tar_of(with_manifest(built, lambda m: m.update(name="Iris Model"))), "$.name")
    files = members_of(built)
    files["manifest.json"] = b"{not json"
    rejects(tar_of(files), "invalid manifest.json", "not JSON")


def test_rejects_unknown_flavor(built: BuiltPackage) -> None:
    """A flavor outside sklearn/onnx/xgboost/lightgbm is refused by name."""
    rejects(tar_of(with_manifest(built, lambda m: m.update(flavor="pytorch"))), "unknown flavor 'pytorch'")


def test_rejects_unknown_runtime(built: BuiltPackage) -> None:
    """A runtime no node can serve is refused by name."""
    rejects(tar_of(with_manifest(built, lambda m: m.update(runtime="tensorrt"))), "unknown runtime 'tensorrt'")


def test_rejects_missing_listed_file(built: BuiltPackage) -> None:
    """A file the manifest lists but the archive lacks is refused and named."""
    files = members_of(built)
    del files["samples.json"]
    rejects(tar_of(files), "'samples.json'", "missing from the archive")


def test_rejects_unlisted_file(built: BuiltPackage) -> None:
    """A file the archive holds but the manifest does not list is refused and named."""
    files = members_of(built)
    files["extra.bin"] = b"payload"
    rejects(tar_of(files), "'extra.bin'", "not listed in the manifest")


def test_rejects_checksum_mismatch(built: BuiltPackage) -> None:
    """A file whose content does not hash to the manifest's sha256 is refused and named."""
    files = members_of(built)
    files["model.skops"] = files["model.skops"] + b"tampered"
    rejects(tar_of(files), "'model.skops'", "checksum mismatch")


def test_rejects_oversized_member(built: BuiltPackage) -> None:
    """A member over max_member_bytes is refused from its header, naming it and the limit."""
    size = len(members_of(built)["model.skops"])
    rejects(built.data, "'model.skops'", "oversized", str(size - 1), max_member_bytes=size - 1)


def test_rejects_oversized_header_before_reading() -> None:
    """The size check uses the header: a member claiming 1 TiB is refused without reading content."""
    huge = tarfile.TarInfo("model.skops")
    huge.size = 1 << 40
    data = huge.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024  # the content is simply not there
    rejects(data, "'model.skops'", "oversized")


def test_rejects_too_many_members(built: BuiltPackage) -> None:
    """More members than max_members is refused."""
    files = members_of(built)
    rejects(make_tar([*(reg(n, d) for n, d in files.items()), *(reg(f"f{i}", b"") for i in range(10))]),
            "too many members", max_members=5)


def test_rejects_total_too_large(built: BuiltPackage) -> None:
    """Members adding up to more than max_total_bytes are refused, naming the member that crossed the limit."""
    files = members_of(built)
    limit = len(files["manifest.json"]) + len(files["model.skops"])  # samples.json comes last and crosses it
    rejects(built.data, "archive too large", "'samples.json'", max_total_bytes=limit)


def test_rejects_gzip_bomb() -> None:
    """A gzip stream that inflates past the total limit is refused without inflating it all."""
    bomb = gzip.compress(make_tar([reg("zeros.bin", b"\0" * (4 << 20))]), mtime=0)
    rejects(bomb, "archive too large", max_total_bytes=1 << 20)


def test_gzip_bomb_refused_at_its_header_by_ratio() -> None:
    """A member declaring more than max_ratio times the compressed size is refused at its header."""
    bomb = gzip.compress(make_tar([reg("zeros.bin", b"\0" * (80 << 20))]), mtime=0)
    rejects(bomb, "archive too large", "times the", max_ratio=30)
    rejects(bomb, "archive too large", max_total_bytes=1 << 20)


def test_gzip_lying_header_bounded_and_trailing_data_refused(built: BuiltPackage) -> None:
    """A gzip tar with zeros hidden past its end blocks is bounded; trailing bytes after gzip are refused."""
    hidden = gzip.compress(built.data + b"\0" * (8 << 20), mtime=0)
    rejects(hidden, "archive too large", max_total_bytes=1 << 20)
    rejects(gzip.compress(built.data, mtime=0) + b"junk", "trailing data")
    rejects(gzip.compress(built.data, mtime=0)[:-20], "gzip")


def test_manifest_size_and_depth_bounded(built: BuiltPackage) -> None:
    """manifest.json over 1 MiB, or nested 100,000 deep, is a PackageError (never a RecursionError)."""
    files = members_of(built)
    big = files["manifest.json"][:-1] + b', "description": "' + b"x" * (1 << 20) + b'"}'
    rejects(make_tar([reg("manifest.json", big), *[reg(n, d) for n, d in files.items() if n != "manifest.json"]]),
            "oversized", "manifest")
    deep = b'{"labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    rejects(make_tar([reg("manifest.json", deep)]), "manifest.json")


def test_peek_manifest_reads_the_first_member_only(built: BuiltPackage) -> None:
    """peek_manifest finds the manifest of a package, and answers None for a bomb without inflating it."""
    from modelcd.store.package import peek_manifest

    assert peek_manifest(built.data) == members_of(built)["manifest.json"]
    assert peek_manifest(gzip.compress(built.data, mtime=0)) == members_of(built)["manifest.json"]
    bomb = gzip.compress(make_tar([reg("zeros.bin", b"\0" * (256 << 20))]), mtime=0)
    assert peek_manifest(bomb) is None
    assert peek_manifest(b"garbage") is None


def test_expiry_and_nonfinite_outputs_bounded(built: BuiltPackage) -> None:
    """expiry_seconds 10^30 and NaN expected outputs are refused; allow_nonfinite admits NaN outputs."""
    import json

    files = members_of(built)
    manifest = json.loads(files["manifest.json"])
    rest = [reg(n, d) for n, d in files.items() if n != "manifest.json"]
    rejects(make_tar([reg("manifest.json", json.dumps({**manifest, "expiry_seconds": 10**30}).encode()), *rest]),
            "expiry_seconds", "100 years")
    samples = json.loads(files["samples.json"])
    samples["outputs"]["probabilities"][0][0] = float("nan")
    nan_bytes = json.dumps(samples).encode()
    for allow in (False, True):
        m = {**manifest, "allow_nonfinite": allow,
             "files": {**manifest["files"], "samples.json": hashlib.sha256(nan_bytes).hexdigest()}}
        tar = make_tar([reg("manifest.json", json.dumps(m).encode()),
                        *[reg(n, nan_bytes if n == "samples.json" else d) for n, d in files.items()
                          if n != "manifest.json"]])
        if allow:
            assert read_package(tar).manifest.allow_nonfinite
        else:
            rejects(tar, "NaN or infinity", "allow_nonfinite")


@pytest.mark.parametrize("data", [b"", b"hello, not a tar", b"\x1f\x8bnot gzip either", b"PK\x03\x04zip"])
def test_rejects_not_a_tar(data: bytes) -> None:
    """Bytes that are no (gzip) tar archive are refused as such."""
    message = rejects(data)
    assert "not a tar archive" in message or "gzip" in message, message


def test_rejects_bad_samples(built: BuiltPackage) -> None:
    """A samples file that does not fit the signature is refused, naming the tensor (checksums made valid)."""
    files = members_of(built)
    files["samples.json"] = json.dumps({"inputs": {"input": [[1.0, 2.0]]}, "outputs": {}}).encode()
    manifest = json.loads(files["manifest.json"])
    manifest["files"]["samples.json"] = hashlib.sha256(files["samples.json"]).hexdigest()
    files["manifest.json"] = json.dumps(manifest).encode()
    rejects(tar_of(files), "samples.json", "inputs.input")


# --------------------------------------------------------------------------------------------------------------
# Format


def test_build_is_deterministic(iris_model: LogisticRegression) -> None:
    """The same model built twice, even as a different object (unpickled copy), gives byte-identical archives."""
    def build(model: object, compress: bool) -> BuiltPackage:
        return build_package(model, name="iris", version="1", owner="o", expiry=3600, sample_inputs=IRIS_SAMPLES,
                             compress=compress)

    copy = pickle.loads(pickle.dumps(iris_model))
    for compress in (False, True):
        a, b = build(iris_model, compress), build(copy, compress)
        assert a.data == b.data
        assert a.sha256 == b.sha256 == hashlib.sha256(a.data).hexdigest()


def test_archive_headers_are_normalized(built: BuiltPackage) -> None:
    """Every member is a regular file with mtime 0, uid/gid 0, mode 0644; manifest first, then sorted."""
    with tarfile.open(fileobj=io.BytesIO(built.data)) as tf:
        infos = tf.getmembers()
    assert [i.name for i in infos] == ["manifest.json", "model.skops", "samples.json"]
    assert all(i.isreg() and i.mtime == 0 and i.uid == i.gid == 0 and i.mode == 0o644 and not i.uname
               for i in infos)


def test_gzip_archive_reads_back(iris_model: LogisticRegression) -> None:
    """A gzip package reads back with the id of its compressed bytes."""
    b = build_package(iris_model, name="iris", version="1", owner="o", expiry=60, sample_inputs=IRIS_SAMPLES,
                      compress=True)
    pkg = read_package(b.data)
    assert b.data[:2] == b"\x1f\x8b"
    assert pkg.sha256 == b.sha256 and pkg.manifest == b.manifest


def test_manifest_contents(built: BuiltPackage) -> None:
    """build_package records flavor, runtime, inferred signature, expiry and a checksum of every file."""
    m = built.manifest
    assert (m.flavor, m.runtime, m.model_file, m.expiry_seconds) == ("sklearn", "sklearn", "model.skops", 30 * 86400)
    assert m.inputs == [TensorSpec(name="input", datatype="FP64", shape=[-1, 4])]
    assert m.outputs == [TensorSpec(name="label", datatype="INT64", shape=[-1]),
                         TensorSpec(name="probabilities", datatype="FP64", shape=[-1, 3])]
    assert sorted(m.files) == ["model.skops", "samples.json"]
    assert m.fallback_runtime is None


def test_extract_package(built: BuiltPackage, tmp_path: Path) -> None:
    """extract_package writes the checked files into an empty directory and refuses a non-empty one."""
    dest = tmp_path / "pkg"
    pkg = extract_package(built.data, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "model.skops", "samples.json"]
    assert (dest / "model.skops").read_bytes() == pkg.read("model.skops")
    rt = load_runtime(pkg.manifest, dest)
    s = pkg.samples()
    assert outputs_match(s.outputs, rt.predict(s.inputs), pkg.manifest.tolerance) is None
    with pytest.raises(PackageError, match="not an empty directory"):
        extract_package(built.data, dest)


# --------------------------------------------------------------------------------------------------------------
# Round trips per flavor


def round_trip(built: BuiltPackage) -> dict[str, np.ndarray]:
    pkg = read_package(built.data)
    rt = load_runtime(pkg.manifest, pkg.contents)
    try:
        samples = pkg.samples()
        actual = rt.predict(samples.inputs)
        assert outputs_match(samples.outputs, actual, pkg.manifest.tolerance) is None
        return actual
    finally:
        rt.close()


def test_round_trip_sklearn(iris_model: LogisticRegression, built: BuiltPackage) -> None:
    """sklearn: build -> read -> load -> predict gives the stored outputs, which are the estimator's own."""
    out = round_trip(built)
    np.testing.assert_array_equal(out["label"], iris_model.predict(IRIS_SAMPLES))
    np.testing.assert_allclose(out["probabilities"], iris_model.predict_proba(IRIS_SAMPLES))


def test_round_trip_onnx() -> None:
    """onnx (ModelProto and raw bytes): skl2onnx names map to `prediction`, shape [-1] as in sklearn."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    model = LinearRegression().fit(DIAB_X, DIAB_Y)
    proto = convert_sklearn(model, name="diabetes", initial_types=[("x", FloatTensorType([None, 10]))])
    samples = DIAB_SAMPLES.astype(np.float32)
    for m in (proto, proto.SerializeToString()):
        b = build_package(m, name="diabetes", version="2", owner="o", expiry="1w", sample_inputs={"x": samples},
                          outputs=[TensorSpec(name="prediction", datatype="FP32", shape=[-1])])
        assert b.manifest.flavor == b.manifest.runtime == "onnx"
        np.testing.assert_allclose(round_trip(b)["prediction"], model.predict(DIAB_SAMPLES), rtol=1e-5)


def test_round_trip_xgboost() -> None:
    """xgboost: a classifier's label/probabilities and a regressor's prediction match the sklearn wrappers."""
    import xgboost as xgb

    clf = xgb.XGBClassifier(n_estimators=4, max_depth=2, n_jobs=1).fit(IRIS_X, IRIS_Y)
    b = build_package(clf, name="iris-xgb", version="1", owner="o", expiry="1d", sample_inputs=IRIS_SAMPLES)
    assert [o.name for o in b.manifest.outputs] == ["label", "probabilities"]
    out = round_trip(b)
    np.testing.assert_array_equal(out["label"], clf.predict(IRIS_SAMPLES))
    np.testing.assert_allclose(out["probabilities"], clf.predict_proba(IRIS_SAMPLES), rtol=1e-6)

    reg = xgb.XGBRegressor(n_estimators=4, max_depth=2, n_jobs=1).fit(DIAB_X, DIAB_Y)
    b = build_package(reg.get_booster(), name="diab-xgb", version="1", owner="o", expiry="1d",
                      sample_inputs=DIAB_SAMPLES)
    np.testing.assert_allclose(round_trip(b)["prediction"], reg.predict(DIAB_SAMPLES), rtol=1e-6)


def test_round_trip_lightgbm() -> None:
    """lightgbm: a classifier's label/probabilities and a regressor's prediction match the sklearn wrappers."""
    import lightgbm as lgb

    clf = lgb.LGBMClassifier(n_estimators=4, num_leaves=4, verbose=-1, n_jobs=1).fit(IRIS_X, IRIS_Y)
    b = build_package(clf, name="iris-lgb", version="1", owner="o", expiry="1d", sample_inputs=IRIS_SAMPLES)
    out = round_trip(b)
    np.testing.assert_array_equal(out["label"], clf.predict(IRIS_SAMPLES))
    np.testing.assert_allclose(out["probabilities"], clf.predict_proba(IRIS_SAMPLES), rtol=1e-6)

    reg = lgb.LGBMRegressor(n_estimators=4, num_leaves=4, verbose=-1, n_jobs=1).fit(DIAB_X, DIAB_Y)
    b = build_package(reg.booster_, name="diab-lgb", version="1", owner="o", expiry="1d", sample_inputs=DIAB_SAMPLES)
    np.testing.assert_allclose(round_trip(b)["prediction"], reg.predict(DIAB_SAMPLES), rtol=1e-6)


def test_expected_outputs_are_verified(iris_model: LogisticRegression) -> None:
    """Given expected outputs that the model does not reproduce, the build fails naming the output."""
    wrong = {"label": np.zeros(len(IRIS_SAMPLES), dtype=np.int64),
             "probabilities": iris_model.predict_proba(IRIS_SAMPLES)}
    with pytest.raises(PackageError, match="output 'label'"):
        build_package(iris_model, name="iris", version="1", owner="o", expiry=60, sample_inputs=IRIS_SAMPLES,
                      expected_outputs=wrong)


# --------------------------------------------------------------------------------------------------------------
# Runtime safety


class Doubled(LinearRegression):
    """A custom estimator: skops does not trust its type."""

    def predict(self, X):  # type: ignore[no-untyped-def]
        return 2 * super().predict(X)


def test_skops_untrusted_types_refused() -> None:
    """A skops file holding a type nobody trusted is refused at build and load; trusting it by name works."""
    model = Doubled().fit(DIAB_X, DIAB_Y)
    type_name = f"{Doubled.__module__}.{Doubled.__qualname__}"
    with pytest.raises(PackageError, match="untrusted types"):
        build_package(model, name="d", version="1", owner="o", expiry=60, sample_inputs=DIAB_SAMPLES)
    b = build_package(model, name="d", version="1", owner="o", expiry=60, sample_inputs=DIAB_SAMPLES,
                      trusted_types=[type_name])
    pkg = read_package(b.data)
    with pytest.raises(ModelLoadError, match=type_name):
        load_runtime(pkg.manifest, pkg.contents)
    rt = load_runtime(pkg.manifest, pkg.contents, trusted_types=[type_name])
    np.testing.assert_allclose(rt.predict(pkg.samples().inputs)["prediction"], model.predict(DIAB_SAMPLES))


def test_pickle_needs_explicit_trust(iris_model: LogisticRegression, tmp_path: Path) -> None:
    """A pickle model file is refused unless trust_pickle=True, and is then stored as skops, not pickle."""
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(iris_model))
    with pytest.raises(PackageError, match="trust_pickle"):
        build_package(path, name="iris", version="1", owner="o", expiry=60, sample_inputs=IRIS_SAMPLES)
    b = build_package(path, name="iris", version="1", owner="o", expiry=60, sample_inputs=IRIS_SAMPLES,
                      trust_pickle=True)
    assert b.manifest.model_file == "model.skops"
    round_trip(b)


def test_missing_extra_names_the_install(built: BuiltPackage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the flavor's library, loading says which extra to install."""
    pkg = read_package(built.data)
    manifest = msgspec.structs.replace(pkg.manifest, flavor="lightgbm", runtime="lightgbm")
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'modelcd\[lightgbm\]'"):
        load_runtime(manifest, pkg.contents)


def test_predict_rejects_bad_inputs(built: BuiltPackage) -> None:
    """Inputs off the signature (wrong width, missing, unknown, strings) raise InvalidInputError naming them."""
    pkg = read_package(built.data)
    rt = load_runtime(pkg.manifest, pkg.contents)
    with pytest.raises(InvalidInputError, match=r"shape \[2, 3\]"):
        rt.predict({"input": np.zeros((2, 3))})
    with pytest.raises(InvalidInputError, match="missing input 'input'"):
        rt.predict({})
    with pytest.raises(InvalidInputError, match="unknown inputs"):
        rt.predict({"input": np.zeros((1, 4)), "other": [1]})
    with pytest.raises(InvalidInputError, match="'input'"):
        rt.predict({"input": [["a", "b", "c", "d"]]})
    assert rt.predict({"input": [[5, 3, 1, 0]]})["label"].shape == (1,)  # ints cast safely to FP64


def test_outputs_match_reasons() -> None:
    """outputs_match says which output differs and by how much; None when within tolerance."""
    assert outputs_match({"p": [1.0, 2.0]}, {"p": [1.0, 2.0 + 1e-9]}, 1e-6) is None
    reason = outputs_match({"p": [1.0, 2.0]}, {"p": [1.0, 2.5]}, 1e-6)
    assert reason is not None and "'p'" in reason and "max abs diff 0.5" in reason
    assert "missing" in str(outputs_match({"p": [1.0]}, {}, 1e-6))
    assert "'label'" in str(outputs_match({"label": np.array([1, 2])}, {"label": np.array([1, 3])}, 0.5))


# --------------------------------------------------------------------------------------------------------------
# Spec files and durations


def test_build_from_yaml_spec(iris_model: LogisticRegression, tmp_path: Path) -> None:
    """A YAML spec with inline samples builds the package, with paths relative to the spec."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "iris.skops").write_bytes(sio.dumps(iris_model))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: iris\nversion: 1.2.0\nflavor: sklearn\nmodel_file: models/iris.skops\nowner: team-a\n"
        "expiry: 12h\ndescription: iris classifier\nlabels: {team: a}\n"
        f"sample_inputs:\n  features: {json.dumps(IRIS_SAMPLES[:3].tolist())}\n"
    )
    b = build_from_spec(spec)
    m = b.manifest
    assert (m.name, m.version, m.expiry_seconds, m.labels) == ("iris", "1.2.0", 12 * 3600, {"team": "a"})
    assert m.inputs[0].name == "features"
    round_trip(b)


def test_build_from_json_spec_with_samples_file(iris_model: LogisticRegression, tmp_path: Path) -> None:
    """A JSON spec pointing at a samples file with expected outputs builds a package with those outputs."""
    (tmp_path / "model.skops").write_bytes(sio.dumps(iris_model))
    (tmp_path / "samples.json").write_text(json.dumps({
        "inputs": {"input": IRIS_SAMPLES.tolist()},
        "outputs": {"label": iris_model.predict(IRIS_SAMPLES).tolist(),
                    "probabilities": iris_model.predict_proba(IRIS_SAMPLES).tolist()},
    }))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "iris", "version": "3", "model_file": "model.skops", "owner": "o",
                                "expiry": 86400, "samples_file": "samples.json"}))
    b = build_from_spec(spec)
    assert b.manifest.flavor == "sklearn" and b.manifest.expiry_seconds == 86400
    round_trip(b)


def test_spec_errors_are_named(tmp_path: Path) -> None:
    """Spec mistakes (unknown key, missing field, bad expiry) are PackageErrors that name the problem."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\nversion: 1\nmodel_file: m.skops\nowner: o\nexpiry: 1d\nsampels: []\n")
    with pytest.raises(PackageError, match="sampels"):
        build_from_spec(spec)
    spec.write_text("name: x\nversion: 1\nmodel_file: m.skops\nexpiry: 1d\n")
    with pytest.raises(PackageError, match="owner"):
        build_from_spec(spec)
    spec.write_text("name: x\nversion: 1\nmodel_file: m.skops\nowner: o\nexpiry: soon\nsample_inputs: [[1]]\n")
    with pytest.raises(PackageError, match="invalid duration 'soon'"):
        build_from_spec(spec)


@pytest.mark.parametrize(("text", "seconds"), [
    ("30d", 30 * 86400), ("12h", 43200), ("3600s", 3600), ("3600", 3600), (90, 90), ("90m", 5400),
    ("2w", 14 * 86400), ("1d12h", 129600), (" 5 m ", 300), ("1.5h", 5400),
])
def test_parse_duration(text: str | int, seconds: int) -> None:
    """parse_duration accepts seconds and unit suffixes s/m/h/d/w, also summed."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30x", "d30", "1.5s", "0s", "0", -5, "30 days", True])
def test_parse_duration_errors(text: str | int) -> None:
    """Invalid or non-positive durations raise a PackageError quoting the value and showing examples."""
    with pytest.raises(PackageError, match=r"invalid duration .*'30d'"):
        parse_duration(text)


@pytest.mark.parametrize(("field", "value"), [("name", "iris\n"), ("version", "1.0.0\n"), ("model_file", "model.skops\n")])
def test_a_trailing_newline_is_not_a_valid_name(built: BuiltPackage, field: str, value: str) -> None:
    """`$` matches before a trailing newline: "iris\\n" passed as a model name (a second "iris" in every listing)."""
    from modelcd.store.package import decode_manifest
    doc = msgspec.to_builtins(read_package(built.data).manifest)
    doc[field] = value
    with pytest.raises(PackageError):
        decode_manifest(json.dumps(doc).encode())
