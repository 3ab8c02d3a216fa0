"""compose.yaml, checked without Docker: every modelcd service runs a command the CLI accepts, with real settings."""

from __future__ import annotations

from pathlib import Path

import yaml

from modelcd.cli import build_parser
from modelcd.settings import Settings

COMPOSE = Path(__file__).resolve().parent.parent / "compose.yaml"


def modelcd_services() -> dict[str, dict]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name: svc for name, svc in services.items() if svc.get("image") == "modelcd:latest"}


def test_every_service_command_parses() -> None:
    services = modelcd_services()
    assert {"ingest", "serving", "shadow-comparison", "rollout-controller", "retirement"} <= set(services)
    parser = build_parser()
    for name, svc in services.items():
        args = parser.parse_args(svc["command"])  # argparse exits (fails the test) on an unknown command
        assert callable(args.func), name


def test_environment_names_real_settings_and_parses() -> None:
    for name, svc in modelcd_services().items():
        env = {k: str(v) for k, v in svc["environment"].items()}
        unknown = {k for k in env if k.startswith("MODELCD_")} - {var for var, _default, _doc in Settings.describe()}
        assert not unknown, (name, unknown)
        settings = Settings.from_env(env)
        assert settings.kafka_bootstrap == "kafka:9092" and settings.idempotence  # real Kafka: idempotent producer
        assert settings.resolved_store_url.startswith("s3://")


def test_front_door_takes_the_serving_port_and_nodes_move() -> None:
    """Clients keep :8081 (the front door, Caddy); serving nodes listen on a port of their own behind it."""
    services = modelcd_services()
    front = Settings.from_env({k: str(v) for k, v in services["frontdoor"]["environment"].items()})
    node = Settings.from_env({k: str(v) for k, v in services["serving"]["environment"].items()})
    assert services["frontdoor"]["command"] == ["frontdoor"] and front.serving_port == 8081
    assert services["frontdoor"]["ports"] == ["8081:8081"]
    assert node.serving_port != 8081 and "ports" not in services["serving"]
