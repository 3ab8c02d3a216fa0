"""Usage reports per second one retirement worker folds into its table.

Starts an embedded broker, fills `modelcd.usage` with N reports over M models (each
advancing last use, so every report is a table write and a changelog record), then
starts one worker and times it from ready until it has handled all of them.

    python bench/bench_retirement.py [--reports 20000] [--models 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import platform
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.codec import encode
from modelcd.events.schemas import UsageReport
from modelcd.events.topics import USAGE
from modelcd.logs import configure
from modelcd.retirement.service import RetirementProcessor
from modelcd.settings import Settings


async def main(reports: int, models: int, out: Path | None = None, timeout: float = 600.0) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedBroker(port=free_port(), log_file=Path(tmp) / "tansu.log")
        await broker.start()
        try:
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=20)
            await producer.start()
            t0 = time.time()
            for i in range(reports):
                r = UsageReport(model=f"model-{i % models}", version="1", node="n1", interval_start=t0,
                                interval_end=t0 + i, count=10, last_used=t0 + i * 0.001)
                key, value, headers = encode(r, "bench")
                await producer.send(USAGE, value, key=key, headers=headers)
            await producer.flush()
            await producer.stop()
            settings = Settings.from_env({}, kafka_bootstrap=broker.bootstrap, kafka_idempotence=False,
                                         home=Path(tmp), retirement_check_interval=3600.0)
            proc = RetirementProcessor(settings)
            await proc.start()
            try:
                start, start_count = time.perf_counter(), proc.stats.usage_reports
                while proc.stats.usage_reports < reports:
                    if time.perf_counter() - start > timeout:
                        raise SystemExit(f"only {proc.stats.usage_reports} of {reports} reports in {timeout:.0f} s")
                    await asyncio.sleep(0.05)
                elapsed = time.perf_counter() - start
            finally:
                await proc.stop()
        finally:
            await broker.stop()
    done = reports - start_count
    print(f"retirement worker: {done} usage reports ({models} models) in {elapsed:.2f}s after ready "
          f"({start_count} handled before ready) = {done / elapsed:,.0f} reports/s "
          f"[{platform.python_implementation()} {platform.python_version()}, {platform.machine()}]")
    if out is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from bench.common import machine

        out.write_text(json.dumps({"scenario": "retirement", "reports": done, "models": models, "elapsed_s": elapsed,
                                   "per_second": done / elapsed, "machine": machine(),
                                   "command": "python bench/bench_retirement.py " + " ".join(sys.argv[1:])}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, default=20_000)
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--json", type=Path, help="write the figures here (bench/run.py reads them)")
    args = ap.parse_args()
    configure("warning", "console")
    asyncio.run(main(args.reports, args.models, args.json))
