"""Prometheus metrics shared by every process. Labels carry stage, topic, target, outcome — never personal data."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECORDS = Counter("relais_records_total", "Records handled by a stage, by outcome", ["stage", "topic", "outcome"])
HANDLE_SECONDS = Histogram(
    "relais_handle_seconds", "Time a stage spent on one record", ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_COMMIT_SECONDS = Histogram(
    "relais_commit_seconds", "Time to publish a batch's outputs and commit its offsets", ["stage"],
)
INGRESS_REQUESTS = Counter("relais_ingress_requests_total", "Ingress HTTP answers by route template and status",
                           ["route", "status"])
BUNDLES_REJECTED = Counter("relais_bundles_rejected_total", "Bundles the validator rejected (errors against TDDUI)",
                           ["producer"])
DELIVERIES = Counter("relais_deliveries_total", "Delivery attempts by target and result", ["target", "result"])
DELIVERY_SECONDS = Histogram(
    "relais_delivery_seconds", "Time a target took to answer one transaction POST (or to fail)", ["target"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DELIVERIES_IN_DOUBT = Counter(
    "relais_deliveries_in_doubt_total",
    "Attempts found in flight after a delivery process stopped (crash): resolved by probe or policy", ["target"],
)

# Operator views (refreshed by the ops lag reader and the alerts loop).
CONSUMER_LAG = Gauge("relais_consumer_lag", "Records not yet committed by a stage, per topic", ["stage", "topic"])
DLQ_SIZE = Gauge("relais_dlq_size", "Dead letters of every stage waiting for an operator")
TARGET_WAITING = Gauge("relais_target_waiting", "Deliveries pending or retrying, per target", ["target"])
TARGET_DOWN = Gauge("relais_target_down", "1 while a target is down (circuit open, or no success since its latest "
                    "failures)", ["target"])
OLDEST_WAITING_SECONDS = Gauge("relais_oldest_waiting_seconds", "Age of the oldest record waiting for a target "
                               "(pending or retrying), since it was accepted", ["target"])
STORAGE_FREE_BYTES = Gauge("relais_storage_free_bytes", "Bytes free on the disk of each local data path (the "
                           "embedded log, a SQLite ledger, the blob directory), as the alerts loop last saw it",
                           ["path"])
ALERTS_FIRING = Gauge("relais_alerts_firing", "Alert rules currently firing", ["rule", "subject"])
