"""Local Apache Kafka for development and tests: `LocalKafka`, `ensure_jars` and `relais dev-kafka`."""

from devtools.devkafka.local import (
    BOOTSTRAP_ENV,
    CACHE_ENV,
    KAFKA_VERSION,
    DevKafkaError,
    DevKafkaUnavailable,
    LocalKafka,
    ensure_jars,
    main,
)

__all__ = [
    "BOOTSTRAP_ENV",
    "CACHE_ENV",
    "KAFKA_VERSION",
    "DevKafkaError",
    "DevKafkaUnavailable",
    "LocalKafka",
    "ensure_jars",
    "main",
]
