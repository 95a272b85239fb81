"""Router stage: `transfers.validated` → one `deliveries` record per target (claim-checked when large)."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from services.core.blobstore import BlobRef, BlobStore, resolve_payload
from services.core.envelope import JSON, Emit, Record, event, split_csv
from services.core.outcome import operation_outcome
from services.core.targets import TargetDirectory
from services.core.topics import DELIVERIES, REJECTED, VALIDATED
from services.router.logic import delivery_key, route, transfer_info


class RouterStage:
    """Fans each validated transfer out to its targets, each tracked on its own.

    A Bundle above `claim_check_bytes` is stored once in the blob store before the fan-out, so its
    delivery records (and their retries and dead letters) carry a reference and a SHA-256, not N copies.
    """

    name = "router"
    topics: Sequence[str] = (VALIDATED,)

    def __init__(self, directory: TargetDirectory, blobs: BlobStore | None = None,
                 claim_check_bytes: int | None = None) -> None:
        self.directory = directory
        self.blobs = blobs
        self.claim_check_bytes = claim_check_bytes

    async def handle(self, record: Record) -> Sequence[Emit]:
        """Route one transfer; a transfer with no reachable target is rejected, never dropped."""
        env = record.envelope
        payload = env.data if self.blobs is None else await resolve_payload(self.blobs, env.data, env.extra)
        try:
            bundle = orjson.loads(payload)
        except orjson.JSONDecodeError:
            bundle = None
        info = transfer_info(bundle, split_csv(env.extra.get("targets")), env.producer)
        routing = route(info, self.directory)
        if routing.issues:
            outcome = operation_outcome(routing.issues)
            rejected = env.evolve(type="fr.relais.transfer.rejected", source="/relais/router",
                                  data=orjson.dumps(outcome), content_type=JSON)
            return [Emit(REJECTED, record.key, rejected),
                    event(env, "rejected", self.name, {"outcome": outcome})]
        data, extra = env.data, dict(env.extra)
        if (self.blobs is not None and self.claim_check_bytes is not None and BlobRef.from_extra(extra) is None
                and len(env.data) > self.claim_check_bytes):
            ref = await self.blobs.put(env.data)
            data, extra = b"", {**extra, **ref.to_extra()}
        emits = [
            # The record's key is the person's (services.core.person), set at ingress and kept since.
            Emit(DELIVERIES, delivery_key(target, (record.key or b"").decode() or None, env.transfer_id),
                 env.evolve(type="fr.relais.delivery.requested", source="/relais/router", target=target,
                            attempt=0, data=data, extra=extra))
            for target in routing.targets
        ]
        detail: dict[str, object] = {"targets": list(routing.targets), "finess": sorted(info.finess)}
        if routing.added_by:
            detail["added_by_routes"] = {t: r for t, r in routing.added_by}
        emits.append(event(env, "routed", self.name, detail))
        return emits
