"""Settings come from MODELCD_* variables only, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelcd.settings import Settings, SettingsError, parse_size


def test_defaults_without_environment() -> None:
    """With no variables, modelcd runs embedded: no idempotence, local store under .modelcd/."""
    s = Settings.from_env({})
    assert s.kafka_bootstrap is None and s.idempotence is False
    assert s.bootstrap == "127.0.0.1:9092"
    assert s.resolved_store_url.endswith(str(Path(".modelcd") / "store"))


def test_external_kafka_turns_idempotence_on() -> None:
    """Pointing at a Kafka cluster enables the idempotent producer unless told otherwise."""
    assert Settings.from_env({"MODELCD_KAFKA_BOOTSTRAP": "k:9092"}).idempotence is True
    assert Settings.from_env({"MODELCD_KAFKA_BOOTSTRAP": "k:9092", "MODELCD_KAFKA_IDEMPOTENCE": "off"}).idempotence \
        is False


def test_types_are_converted() -> None:
    """Numbers, sizes, booleans and paths are parsed from their text."""
    s = Settings.from_env({"MODELCD_MEMORY_BUDGET": "512MiB", "MODELCD_SERVING_PORT": "9000",
                           "MODELCD_RECONCILE_INTERVAL": "2.5", "MODELCD_HOME": "/tmp/x",
                           "MODELCD_COMPILE_ONNX": "no"})
    assert s.memory_budget == 512 * 1024**2 and s.serving_port == 9000
    assert s.reconcile_interval == 2.5 and s.home == Path("/tmp/x") and s.compile_onnx is False


@pytest.mark.parametrize("name,value", [("MODELCD_SERVING_PORT", "eighty"), ("MODELCD_MEMORY_BUDGET", "1XB"),
                                        ("MODELCD_COMPILE_ONNX", "maybe")])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    """A value that cannot be used raises SettingsError naming the variable."""
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_parse_size() -> None:
    """Sizes accept units, binary multiples."""
    assert parse_size("2g") == 2 * 1024**3 and parse_size("1024") == 1024 and parse_size("1.5KiB") == 1536


def test_every_setting_is_documented() -> None:
    """Every setting has a doc line (the README's table and `modelcd config` print them)."""
    rows = Settings.describe()
    assert rows and all(doc for _, _, doc in rows) and all(n.startswith("MODELCD_") for n, _, _ in rows)


def test_readme_lists_every_setting() -> None:
    """The README's configuration table is the one `modelcd config --markdown` prints (regenerate it when it drifts)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name, _default, doc in Settings.describe():
        assert f"| `{name}` |" in readme, f"{name} missing from README: run `modelcd config --markdown`"
        assert doc in readme, f"{name}'s description drifted in the README"
