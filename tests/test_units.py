"""One grammar for durations and sizes: CLI flags, settings and the parsers the parts keep all agree."""

from __future__ import annotations

import pytest

from modelcd.cli import build_parser
from modelcd.settings import Settings, SettingsError
from modelcd.units import UnitError, format_duration, parse_duration, parse_size


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("1.5", 1.5), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1.5h", 5400.0), ("7d", 604800.0),
    ("2w", 1209600.0), ("1d12h", 129600.0), ("1h 30m", 5400.0), ("10MIN", 600.0), (0, 0.0), (3600, 3600.0),
])
def test_durations_read_the_same_everywhere(text: str | int, seconds: float) -> None:
    """Plain seconds and unit sums are both durations."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "5 parsecs", "-5m", "1h-2m", "nan", True])
def test_bad_durations_say_what_to_write(text: object) -> None:
    """A bad duration names the value and shows examples, with no Python type names."""
    with pytest.raises(UnitError) as info:
        parse_duration(text)  # type: ignore[arg-type]
    assert "e.g. 30s, 5m, 1h, 7d" in str(info.value) and "<class" not in str(info.value)


def test_sizes() -> None:
    """Sizes are bytes or binary units, case-insensitive."""
    assert parse_size("512MiB") == 512 * 1024**2 and parse_size("2g") == 2 * 1024**3 and parse_size("1024") == 1024
    with pytest.raises(UnitError, match="512MiB"):
        parse_size("lots")


def test_format_duration_never_prints_zero_seconds() -> None:
    """Short durations print in milliseconds ("done in 0.0 s" is gone)."""
    assert format_duration(0.012) == "12 ms" and format_duration(3.25) == "3.2 s"
    assert format_duration(5400) == "1h 30m" and format_duration(7 * 86400) == "7d"


@pytest.mark.parametrize(("argv", "attr", "value"), [
    (["deploy", "pkg.tar", "--expiry", "7d"], "expiry", 7 * 86400),
    (["deploy", "pkg.tar", "--timeout", "10m"], "timeout", 600.0),
    (["gc", "--retention", "1h"], "retention", 3600.0),
    (["replay", "modelcd.model-state", "--since", "5m"], "since", 300.0),
    (["logs", "export", "--since", "1h", "--out", "x.parquet"], "since", 3600.0),
])
def test_cli_duration_flags_take_units(argv: list[str], attr: str, value: float) -> None:
    """`deploy --expiry 7d`, `gc --retention 1h`, `replay --since 5m` parse (they were int/float only)."""
    args = build_parser().parse_args(argv)
    assert getattr(args, attr) == value


def test_cli_duration_flag_error_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad duration on a flag exits 2 with the examples, not "invalid int value"."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["deploy", "pkg.tar", "--expiry", "soon"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "e.g. 30s, 5m" in err and "invalid int value" not in err


def test_settings_in_seconds_take_durations() -> None:
    """`MODELCD_GC_RETENTION=7d` works like `--retention 7d`; a bad one names the variable."""
    assert Settings.from_env({"MODELCD_GC_RETENTION": "7d"}).gc_retention == 7 * 86400
    assert Settings.from_env({"MODELCD_PREDICT_TIMEOUT": "500ms"}).predict_timeout == 0.5
    with pytest.raises(SettingsError, match="MODELCD_GC_RETENTION"):
        Settings.from_env({"MODELCD_GC_RETENTION": "forever"})


def test_settings_errors_use_words_not_python_types() -> None:
    """A malformed integer setting says "a whole number", never `<class 'int'>`."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"MODELCD_TOPIC_PARTITIONS": "three"})
    assert "whole number" in str(info.value) and "<class" not in str(info.value)


def test_shadow_until_takes_any_duration() -> None:
    """`shadow add --until 1d12h` works like every other duration (it took only one number and unit)."""
    from modelcd.shadow.relations import parse_time

    assert parse_time("1d12h", now=0.0) == 129600.0 and parse_time("90s", now=10.0) == 100.0
    assert parse_time("2030-01-31", now=0.0) is not None and parse_time("never", now=0.0) is None


def test_every_duration_and_size_setting_takes_units() -> None:
    """Every MODELCD_* setting in seconds takes `1m`, every one in bytes takes `1MiB`."""
    import dataclasses

    for f in dataclasses.fields(Settings):
        doc, name = f.metadata["doc"], "MODELCD_" + f.name.upper()
        if doc.startswith("Seconds") or f.name.endswith(("_timeout", "_interval", "_backoff_max", "_retention")):
            assert getattr(Settings.from_env({name: "1m"}), f.name) == 60.0, name
        if "(bytes or" in doc:
            assert getattr(Settings.from_env({name: "1MiB"}), f.name) == 1024**2, name
