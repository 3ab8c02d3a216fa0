"""On start, ingest puts back on the topics what a broker loss took from it.

- The target state: every ModelState and TrafficPolicy the store holds and the topics lack
  (`modelcd.store.restore`), with the same revisions, so nodes, the retirement processor and the
  CLI see what the store says and the next `traffic set` carries on from the stored revision.
- Requests accepted and not ended (`requests/<id>.json` without `deployments/<id>.json`) that
  `modelcd.deploy-requests` no longer holds are published again, with their own deployment id:
  a deployment in flight at a crash that also lost the broker finishes after the restart, or
  fails with a reason (the pipeline counts pickups and fails a request that keeps killing ingest).
  A request still on the topic is left to the consumer's redelivery, so it is not handled twice.

- The tracking view: `recall_deployments` folds in the deployments the store records and the topics
  no longer hold, so `GET /deployments` lists them (one id is answered from the store anyway).

Both are idempotent: republished events carry deterministic ids, and the pipeline skips a
request whose record exists and resumes one whose target it already wrote.
"""

from __future__ import annotations

import msgspec

from modelcd.events.bus import KafkaConfig, read_topic
from modelcd.events.schemas import DeployRequested, RetireRequested
from modelcd.events.topics import DEPLOY_REQUESTS
from modelcd.logs import get_logger
from modelcd.store.blobs import Store, StoreNotFound
from modelcd.store.restore import Sink, restore_id, restore_targets
from modelcd.store.targets import RECORD_PREFIX, REQUEST_PREFIX, TargetState, id_of, record_key

from .policy import accepted_decoder, record_decoder
from .tracking import TrackingView, view_of_record, view_of_request

SEED_LIMIT = 10_000

log = get_logger("modelcd.ingest.resume")


async def unfinished_requests(store: Store) -> list[DeployRequested | RetireRequested]:
    """Requests on record as accepted whose deployment has no record yet, oldest first."""
    out = []
    for key in await store.list(REQUEST_PREFIX):
        if await store.exists(record_key(id_of(key))):
            await store.delete(key)  # ended; the marker outlived a crash between record and cleanup
            continue
        try:
            accepted = accepted_decoder.decode(await store.get(key))
        except StoreNotFound:
            continue
        except msgspec.DecodeError:
            log.warning("unreadable accepted request; left alone", key=key)
            continue
        out.append((accepted.accepted_at, accepted.request))
    return [req for _at, req in sorted(out, key=lambda x: x[0])]


async def resume(store: Store, cfg: KafkaConfig, sink: Sink, *, topic_prefix: str = "") -> None:
    """Restore the target state on the topics, then publish again the unfinished requests the topic lost."""
    await restore_targets(TargetState(store), cfg, sink, topic_prefix=topic_prefix)
    pending = await unfinished_requests(store)
    if not pending:
        return
    on_topic = {getattr(e, "deployment_id", "") for e, _env, _r in
                await read_topic(cfg, DEPLOY_REQUESTS, topic_prefix=topic_prefix)}
    lost = [req for req in pending if req.deployment_id not in on_topic]
    for req in lost:
        await sink.publish(req, event_id=restore_id("request", req.deployment_id))
    if lost:
        log.warning("published again the requests the broker had lost", deployments=[r.deployment_id for r in lost])


async def recall_deployments(store: Store, view: TrackingView, *, limit: int = SEED_LIMIT) -> int:
    """Fold into the tracking view the deployments the store records and the topics no longer hold (records
    of ended ones, accepted requests of the others), so `GET /deployments` lists them after a broker loss.
    Runs beside the service (the API answers one id from the store meanwhile); at most `limit` are read."""
    added = 0
    keys = [*await store.list(RECORD_PREFIX), *await store.list(REQUEST_PREFIX)]
    for key in keys[:limit]:
        deployment_id = id_of(key)
        if view.deployment(deployment_id) is not None:
            continue
        try:
            raw = await store.get(key)
            stored = (view_of_record(record_decoder.decode(raw), view) if key.startswith(RECORD_PREFIX)
                      else view_of_request(accepted_decoder.decode(raw), view))
        except (StoreNotFound, msgspec.DecodeError):
            continue
        added += view.remember(stored)
    if added:
        log.info("deployments recalled from the store", deployments=added)
    return added
