"""Which bus a process uses: Kafka when RELAIS_KAFKA_BOOTSTRAP is set, else the embedded SQLite log."""

from __future__ import annotations

from services.core.bus import Bus
from services.core.embedded import EmbeddedBus
from services.core.kafka import KafkaBus
from services.core.settings import Settings


def make_bus(settings: Settings) -> Bus:
    """Kafka when RELAIS_KAFKA_BOOTSTRAP is set, else the embedded SQLite log."""
    if settings.kafka_bootstrap:
        return KafkaBus(settings)
    return EmbeddedBus(settings)
