"""Router stage: `transfers.validated` → one `deliveries` record per target."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from services.core.envelope import JSON, Emit, Record, event, split_csv
from services.core.outcome import operation_outcome
from services.core.targets import TargetDirectory
from services.core.topics import DELIVERIES, REJECTED, VALIDATED
from services.router.logic import delivery_key, route


class RouterStage:
    """Fans each validated transfer out to its targets, each tracked on its own."""

    name = "router"
    topics: Sequence[str] = (VALIDATED,)

    def __init__(self, directory: TargetDirectory) -> None:
        self.directory = directory

    async def handle(self, record: Record) -> Sequence[Emit]:
        """Route one transfer; a transfer with no reachable target is rejected, never dropped."""
        env = record.envelope
        routing = route(split_csv(env.extra.get("targets")), self.directory)
        if routing.issues:
            outcome = operation_outcome(routing.issues)
            rejected = env.evolve(type="fr.relais.transfer.rejected", source="/relais/router",
                                  data=orjson.dumps(outcome), content_type=JSON)
            return [Emit(REJECTED, record.key, rejected),
                    event(env, "rejected", self.name, {"outcome": outcome})]
        emits = [
            Emit(DELIVERIES, delivery_key(target, env.extra.get("subject"), env.transfer_id),
                 env.evolve(type="fr.relais.delivery.requested", source="/relais/router", target=target,
                            attempt=0))
            for target in routing.targets
        ]
        emits.append(event(env, "routed", self.name, {"targets": list(routing.targets)}))
        return emits
