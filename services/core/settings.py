"""Typed settings, read once per process from `RELAIS_*` environment variables and passed down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.core.configfile import sha256_fingerprint

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Every Relais setting. Build with `Settings()` (environment) or `Settings(field=...)` in tests.

    Each field is one `RELAIS_<NAME>` environment variable; the README's configuration table lists
    them. Values are checked here so a process fails at start, not on the first record.
    """

    model_config = SettingsConfigDict(env_prefix="RELAIS_", env_file=None, extra="ignore")

    # --- bus -------------------------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        default=None, description="Kafka bootstrap servers (host:port,...). Empty: the embedded SQLite log."
    )
    embedded_log_path: Path = Field(
        default=Path("relais-log.db"),
        description="File of the embedded log (used when no Kafka is configured); its inbox, where the ingress "
                    "writes before its 202, is the file beside it named <stem>.inbox.db.",
    )
    topic_prefix: str = Field(default="", description="Prefix for every topic and consumer group name.")
    topic_partitions: int = Field(default=6, ge=1, description="Partitions of each topic created by Relais.")
    topic_replication: int = Field(default=1, ge=1, description="Replication factor of created topics.")
    topic_retention_days: float = Field(
        default=7.0, gt=0, description="Retention of the pipeline topics (received, validated, rejected, deliveries, "
        "retry tiers): long enough to recover from an outage, short because they hold health data.",
    )
    dlq_retention_days: float = Field(
        default=30.0, gt=0, description="Retention of the dead-letter topics and transfers.events (operators' "
        "window to replay; the ledger can be rebuilt from events within it).",
    )
    kafka_timeout_s: float = Field(
        default=10.0, gt=0, description="How long ingress waits for Kafka's acknowledgement before 503."
    )
    kafka_commit_interval_ms: int = Field(
        default=100, ge=0, le=10_000, description="Kafka: the least time between two transactions of one stage "
        "replica. Each transaction costs the broker requests and markers of its own, whatever it carries; under "
        "load, records handled meanwhile share the next one (as Kafka Streams commits every 100 ms). An idle "
        "stage's record is committed at once. 0: a transaction as soon as the previous one ends (about 30% fewer "
        "Bundles/s, see the README's benchmarks).",
    )

    # --- HTTP ingress ------------------------------------------------------------------------
    http_host: str = Field(default="127.0.0.1", description="Address the HTTP ingress listens on.")
    http_port: int = Field(default=8080, ge=0, le=65535, description="Port the HTTP ingress listens on.")
    public_base_url: str | None = Field(
        default=None, description="Base URL producers see (for Content-Location); default: the request's."
    )
    max_body_bytes: int = Field(
        default=10 * MiB, ge=1024, le=30 * MiB, description="Largest Bundle accepted at the door (413 above)."
    )
    producers_file: Path | None = Field(default=None, description="YAML file of producers and token hashes.")
    auth_disabled: bool = Field(
        default=False, description="Accept unauthenticated producers (development only)."
    )
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After sent with 503 when Kafka is down.")

    # --- ingress security (see README, "Security") ------------------------------------------
    tls_certfile: Path | None = Field(
        default=None, description="Ingress server certificate (PEM); set with RELAIS_TLS_KEYFILE to serve HTTPS. "
        "Re-read when it changes.",
    )
    tls_keyfile: Path | None = Field(default=None, description="Private key of RELAIS_TLS_CERTFILE (PEM).")
    tls_client_ca_file: Path | None = Field(
        default=None, description="CA bundle (PEM) that issues producers' client certificates; enables mutual TLS "
        "(a client certificate is then verified when presented). Re-read when it changes.",
    )
    tls_crl_file: Path | None = Field(
        default=None, description="CRL (PEM or DER) of the client CA; a revoked producer certificate is refused. "
        "Re-read when it changes.",
    )
    tls_revoked_fingerprints: Annotated[list[str], NoDecode] = Field(
        default=[], description="SHA-256 fingerprints (hex) of client certificates refused whatever the producers "
        "file says (comma-separated or JSON list).",
    )
    body_read_timeout_s: float = Field(
        default=60.0, gt=0, description="Longest time a request body may take to arrive (408 after): a slow or "
        "endless upload does not hold a worker.",
    )
    max_json_depth: int = Field(
        default=64, ge=8, le=1000, description="Deepest JSON nesting accepted in a Bundle (400 above).",
    )
    max_bundle_entries: int = Field(
        default=10000, ge=1, description="Most Bundle.entry items accepted in one transfer (413 above).",
    )
    producer_rate_per_s: float = Field(
        default=0.0, ge=0, description="Requests per second each producer may make (token bucket, burst "
        "RELAIS_PRODUCER_RATE_BURST; 429 + Retry-After above). 0: no rate limit. Production: e.g. 20.",
    )
    producer_rate_burst: int = Field(
        default=100, ge=1, description="Requests a producer may make at once before the rate limit applies.",
    )
    producer_max_concurrent: int = Field(
        default=0, ge=0, description="Requests one producer may have in flight at once (429 above). 0: no limit. "
        "Production: e.g. 16.",
    )
    http_header_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest time a client may take to send a request's headers (from "
        "connecting, or from its previous response); slower connections are closed (slow-loris).",
    )
    http_max_connections: int = Field(
        default=1000, ge=1, description="Most HTTP connections ingress keeps open (also capped by the file-"
        "descriptor limit); over it, the oldest connection still waiting for its headers is closed.",
    )
    idempotency_window_s: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="How long a producer's Idempotency-Key (or Bundle.identifier) "
        "names its transfer: a resend within the window answers the same transfer and delivers nothing twice. "
        "Default: the pipeline topics' retention.",
    )
    auth_reload_s: float = Field(
        default=5.0, gt=0, description="How often the producers and operators files (and TLS files) are checked "
        "for changes; a changed file is re-read without restart.",
    )

    # --- encryption at rest ------------------------------------------------------------------
    encryption_keys: str | None = Field(
        default=None, description="Key-encryption keys 'kid:base64(32 bytes)', comma-separated; the first (or "
        "RELAIS_ENCRYPTION_KEY_ID) encrypts, all decrypt. Set to encrypt record values and blobs (AES-256-GCM).",
    )
    encryption_keys_file: Path | None = Field(
        default=None, description="File of key-encryption keys, one 'kid:base64' per line (first encrypts); "
        "re-read when it changes, so keys rotate without restart.",
    )
    encryption_key_id: str | None = Field(
        default=None, description="Id of the key that encrypts new records (default: the first key listed).",
    )

    # --- audit trail (services/tracker/auditkey.py) -------------------------------------------
    audit_key: str | None = Field(
        default=None, description="Key of the audit trail's HMAC chain (base64, >= 32 bytes; 'relais keys "
        "new-audit-key'). Never stored in the database; every process needs the same key (the trail's MACs, the "
        "ingress's person keys, the ledger's identifier search keys).",
    )
    audit_key_file: Path | None = Field(
        default=None, description="File holding RELAIS_AUDIT_KEY (a mounted secret). Neither set: with a SQLite "
        "ledger, relais-audit.key beside it is created; with PostgreSQL, start is refused.",
    )
    audit_anchor_s: float = Field(
        default=60.0, gt=0, description="How often the tracker writes the audit chain's head (sequence + MAC) to "
        "the log and the compacted audit.head topic, outside the database: verify detects truncation against it.",
    )
    audit_refusal_every_s: float = Field(
        default=60.0, gt=0, description="Failed authentications (401/403) are audited at most once per client, "
        "surface and reason in this many seconds; the next row counts the ones left out.",
    )

    # --- routing and delivery ----------------------------------------------------------------
    targets_file: Path | None = Field(default=None, description="YAML file of targets (id, base_url, ...).")
    retry_delays_s: list[float] = Field(
        default=[10.0, 60.0, 600.0], min_length=1,
        description="Delay of each retry tier (one topic per tier), JSON list.",
    )
    max_attempts: int = Field(default=8, ge=1, description="Attempts before a delivery is dead-lettered.")
    # Per-target back-pressure and latency (issue 15); a target's own `backlog` / `latency_budget_s` override.
    target_backlog_records: int = Field(
        default=200, ge=0, description="Records a delivery process keeps waiting for a busy target's concurrency "
        "slot, per target; past it they overflow (RELAIS_TARGET_BACKLOG_OVERFLOW), never holding other targets.",
    )
    target_backlog_wait_s: float = Field(
        default=30.0, gt=0, description="How long a record may wait in memory for a busy target's slot before it "
        "overflows (a waiting record holds its partition's commit).",
    )
    target_backlog_overflow: Literal["wait", "refuse"] = Field(
        default="wait", description="What happens to a record past a target's backlog bound: wait (parked in a "
        "retry tier, attempts unchanged, its person's later records behind it) or refuse (dead-lettered for "
        "that target).",
    )
    target_latency_budget_s: float = Field(
        default=10.0, gt=0, description="A target whose p99 latency over its last 100 calls exceeds this is "
        "degraded (ops targets view, alert target_slow).",
    )
    transfer_tag_system: str = Field(
        default="https://relais.esms.fr/fhir/CodeSystem/transfer", min_length=1,
        description="System of the meta.tag (code: the transfer id) Relais adds to every resource it delivers; "
        "after an ambiguous failure or a crash, delivery searches the target for it (_tag) to learn whether "
        "this transfer was applied.",
    )
    claim_check_bytes: int = Field(
        default=1 * MiB, ge=1024, description="Bundles above this size travel as a blob-store reference + SHA-256.",
    )
    blob_dir: Path = Field(
        default=Path("relais-blobs"), description="Local blob store directory (shared by every process).",
    )
    blob_s3_endpoint: str | None = Field(
        default=None, description="S3-compatible blob store endpoint (https://host); set it to use S3.",
    )
    blob_s3_bucket: str | None = Field(default=None, description="S3 bucket of the blob store.")
    blob_s3_region: str = Field(default="us-east-1", description="S3 region (SigV4 signing).")
    blob_s3_access_key_id: str | None = Field(default=None, description="S3 access key id.")
    blob_s3_secret_access_key: str | None = Field(default=None, description="S3 secret access key.")
    ops_token: str | None = Field(
        default=None, description="A bearer token with the operator role on /ops (besides RELAIS_OPERATORS_FILE).",
    )

    # --- validation --------------------------------------------------------------------------
    validation_warnings_as_errors: bool = Field(
        default=False, description="Treat every validation warning as an error (the transfer is rejected).",
    )
    validation_ignore_rules: Annotated[list[str], NoDecode] = Field(
        default=[], description="Validation rule ids to ignore (comma-separated or JSON list; a trailing '/' "
        "ignores a prefix), e.g. for an IG rule that is itself defective.",
    )

    # --- ledger ------------------------------------------------------------------------------
    database_url: str = Field(
        default="sqlite+aiosqlite:///relais-ledger.db", description="SQLAlchemy async URL of the ledger."
    )
    ledger_retention_days: float = Field(
        default=90.0, gt=0, description="`relais ledger purge` removes finished transfers (and their history and "
        "the operator access log) older than this many days.",
    )
    audit_retention_days: float = Field(
        default=1095.0, gt=0, description="`relais ledger purge` removes audit-trail rows older than this many days "
        "(default 3 years: proof of who sent, received and looked at what outlives the transfers themselves).",
    )

    # --- operators ---------------------------------------------------------------------------
    operators_file: Path | None = Field(
        default=None, description="YAML file of operators (id, token_sha256, role viewer|operator) for /ops and "
        "the dashboard (/ops/ui); separate from producers.",
    )
    alert_interval_s: float = Field(default=30.0, gt=0, description="How often the alert rules are evaluated.")
    alert_dlq_max: int = Field(
        default=0, ge=0, description="Alert while more dead letters than this (any stage) wait for an operator; "
        "resolves only once they are replayed or discarded.",
    )
    alert_waiting_age_s: float = Field(
        default=900.0, gt=0, description="Alert while a target's oldest waiting record (pending or retrying) was "
        "accepted longer ago than this.",
    )
    alert_for_s: float = Field(
        default=0.0, ge=0, description="A rule must hold this long before it fires (damps flapping).",
    )
    alert_keep_firing_s: float = Field(
        default=120.0, ge=0, description="A firing alert resolves only after its condition has been clear this long "
        "(damps flapping).",
    )
    alert_repeat_s: float = Field(
        default=3600.0, ge=0, description="A still-firing alert is notified again this often (0: never).",
    )
    alert_webhook_timeout_s: float = Field(
        default=5.0, gt=0, description="Timeout of one webhook POST; notifications go out concurrently.",
    )
    alert_webhook_backoff_max_s: float = Field(
        default=60.0, gt=0, description="Longest wait between retries of a notification the webhook refused (5xx) "
        "or could not receive; retries go on, with backoff, until it is accepted.",
    )
    alert_lag_max: int = Field(default=1000, ge=1, description="Alert when a stage's consumer lag exceeds this.")
    alert_waiting_max: int = Field(
        default=100, ge=1, description="Alert when more records than this wait for one target (pending or retrying).",
    )
    alert_webhook_url: str | None = Field(
        default=None, description="Alerts are POSTed here as JSON (besides the log) when set.",
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Worker processes (no HTTP ingress) serve Prometheus /metrics on "
        "this port when set; ingress serves it on its own port.",
    )

    # --- process -----------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: JSON unless stderr is a terminal."
    )
    shutdown_grace_s: float = Field(
        default=20.0, gt=0, description="On SIGTERM, how long in-flight records may take before exit."
    )
    batch_size: int = Field(
        default=100, ge=1, description="Records a stage holds fetched and not yet handled (its lanes share them).",
    )
    workers: int = Field(
        default=0, ge=0, description="`relais run`: worker processes beside the ingress process, each running every "
        "worker stage (`--workers N` overrides). 0: one per core.",
    )
    instance_id: str | None = Field(
        default=None,
        description="Stable id of this replica (Kafka transactional ids). Set it per replica (e.g. the pod "
        "name) so a restarted replica fences its crashed predecessor at once; default: random.",
    )

    @field_validator("retry_delays_s")
    @classmethod
    def _positive_delays(cls, v: list[float]) -> list[float]:
        if any(d <= 0 for d in v):
            raise ValueError("every retry delay must be > 0 seconds, e.g. RELAIS_RETRY_DELAYS_S='[10, 60, 600]'")
        return v

    @field_validator("tls_revoked_fingerprints", mode="before")
    @classmethod
    def _fingerprints(cls, v: object) -> object:
        if isinstance(v, str):
            v = json.loads(v) if v.lstrip().startswith("[") else v.split(",")
        if isinstance(v, list):
            return [sha256_fingerprint(r) for r in v if isinstance(r, str) and r.strip()]
        return v

    @field_validator("validation_ignore_rules", mode="before")
    @classmethod
    def _rule_list(cls, v: object) -> object:
        if isinstance(v, str):  # from the environment: a JSON list, or rule ids separated by commas
            v = json.loads(v) if v.lstrip().startswith("[") else v.split(",")
        if isinstance(v, list):
            return [r.strip() if isinstance(r, str) else r for r in v if not isinstance(r, str) or r.strip()]
        return v

    @field_validator("kafka_bootstrap")
    @classmethod
    def _blank_is_none(cls, v: str | None) -> str | None:
        return v.strip() or None if v is not None else None

    @model_validator(mode="after")
    def _check_files(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("set both RELAIS_TLS_CERTFILE and RELAIS_TLS_KEYFILE (or neither)")
        if self.tls_client_ca_file is not None and self.tls_certfile is None:
            raise ValueError("RELAIS_TLS_CLIENT_CA_FILE (mutual TLS) needs RELAIS_TLS_CERTFILE and RELAIS_TLS_KEYFILE")
        for name in ("producers_file", "targets_file", "operators_file", "tls_certfile", "tls_keyfile",
                     "tls_client_ca_file", "tls_crl_file", "encryption_keys_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                env = f"RELAIS_{name.upper()}"
                raise ValueError(f"{env}={path} does not exist or is not a file; fix the path or unset {env}")
        return self

    def topic(self, name: str) -> str:
        """The physical topic name for a logical one (prefix applied)."""
        return f"{self.topic_prefix}{name}"

    def group(self, stage: str) -> str:
        """The consumer group of a stage (prefix applied)."""
        return f"{self.topic_prefix}relais-{stage}"
