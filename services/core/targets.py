"""The target directory and routing rules (RELAIS_TARGETS_FILE, YAML), checked once at start.

```yaml
targets:
  - id: essms-les-tilleuls              # what producers name in X-Relais-Target
    base_url: https://fhir.example/fhir # the target's FHIR base; transactions are POSTed here
    finess: "750000001"                 # optional
    headers: {X-Tenant: tilleuls}       # optional extra headers
    auth:                               # optional; default {type: none}
      type: oauth2                      # none | bearer | oauth2
      token_url: https://auth.example/token
      client_id: relais
      client_secret_env: TILLEULS_SECRET
      scope: system/*.write             # optional
    # auth: {type: bearer, token_env: TILLEULS_TOKEN}   (or the shorthand bearer_token_env: ...)
    tls:                                # optional: mutual TLS and/or a private CA
      client_cert: /etc/relais/tilleuls.crt
      client_key: /etc/relais/tilleuls.key
      ca_bundle: /etc/relais/tilleuls-ca.pem
    timeouts: {connect_s: 5, total_s: 30}
    max_concurrency: 4                  # requests in flight to this target, per delivery process
    retry: {delays_s: [10, 60, 600], max_attempts: 8, max_age_s: 172800, jitter: 0.1}
    breaker: {failures: 5, probe_every_s: 30}   # optional slow_call_s + slow_call_rate: see BreakerPolicy
    backlog: {records: 200, wait_s: 30, overflow: wait}  # optional; defaults RELAIS_TARGET_BACKLOG_*
    latency_budget_s: 10                # optional; p99 above it: degraded (default RELAIS_TARGET_LATENCY_BUDGET_S)
    ambiguous: probe                    # probe | retry | dead-letter (request sent, no answer)
    conditional_create: auto            # auto | on | off: request.ifNoneExist on identified entries
    enabled: true                       # false: refused at routing
    paused: false                       # true: records wait (no attempts) until unpaused

routes:                                 # optional: targets added without the producer naming them
  - id: ssiad-stats
    when: {profiles: [tddui-encounter-sejour], producers: [dui-a], finess: ["750000001"]}
    add: [national-stats]
```

A route matches when every condition it gives matches (each list: any of its values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.core.configfile import load_yaml_model, repeated

_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoAuth(_Model):
    """No Authorization header."""

    type: Literal["none"] = "none"


class BearerAuth(_Model):
    """A static bearer token, read from an environment variable (never from the file)."""

    type: Literal["bearer"]
    token_env: str


class OAuth2Auth(_Model):
    """OAuth2 client credentials: a token fetched from `token_url`, cached until it expires."""

    type: Literal["oauth2"]
    token_url: str
    client_id: str
    client_secret_env: str
    scope: str | None = None
    audience: str | None = None

    @field_validator("token_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        return _check_url(v, "token_url")


Auth = Annotated[NoAuth | BearerAuth | OAuth2Auth, Field(discriminator="type")]


class Tls(_Model):
    """Client certificate (mutual TLS) and/or the CA bundle that signs the target's certificate."""

    client_cert: Path | None = None
    client_key: Path | None = None
    ca_bundle: Path | None = None

    @model_validator(mode="after")
    def _files(self) -> Tls:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("give both client_cert and client_key, or neither")
        for name in ("client_cert", "client_key", "ca_bundle"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist or is not a file")
        return self


class Timeouts(_Model):
    """How long one request may take."""

    connect_s: float = Field(default=5.0, gt=0)
    total_s: float = Field(default=30.0, gt=0)


class RetryPolicy(_Model):
    """When to try again after a transient failure, and when to give up (dead letter)."""

    delays_s: tuple[float, ...] | None = Field(default=None, min_length=1)  # None: RELAIS_RETRY_DELAYS_S
    max_attempts: int | None = Field(default=None, ge=1)  # None: RELAIS_MAX_ATTEMPTS
    max_age_s: float = Field(default=2 * 24 * 3600.0, gt=0)  # since the first failure
    jitter: float = Field(default=0.1, ge=0, le=0.5)

    @field_validator("delays_s")
    @classmethod
    def _positive(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and any(d <= 0 for d in v):
            raise ValueError("every retry delay must be > 0 seconds")
        return v


class BreakerPolicy(_Model):
    """Circuit breaker: after `failures` consecutive transient failures, stop sending; probe instead."""

    failures: int = Field(default=5, ge=1)
    probe_every_s: float = Field(default=30.0, gt=0)
    # resilience4j's slow-call threshold: when at least `slow_call_rate` of the last calls (at least 5)
    # took longer than `slow_call_s`, the circuit opens as for failures. None: slowness never opens it.
    slow_call_s: float | None = Field(default=None, gt=0)
    slow_call_rate: float = Field(default=0.5, gt=0, le=1)


class BacklogPolicy(_Model):
    """A busy target's own waiting area (per delivery process); None: the RELAIS_TARGET_BACKLOG_* default.

    Past `records` waiting, or after `wait_s` waiting, a record is moved out: `wait` parks it in a
    retry tier (its person's later records wait behind it), `refuse` dead-letters it for this target.
    """

    records: int | None = Field(default=None, ge=0)
    wait_s: float | None = Field(default=None, gt=0)
    overflow: Literal["wait", "refuse"] | None = None


class RepairPolicy(_Model):
    """Which envelope repairs delivery applies before POSTing (services/delivery/repair.py)."""

    request_url: bool = True  # set entry.request.url to the resource type
    references: bool = True  # urn:uuid fullUrls, intra-Bundle references rewritten to them


class Target(_Model):
    """One system Relais delivers to."""

    id: str = Field(pattern=_ID)
    base_url: str
    finess: str | None = Field(default=None, pattern=r"^\d{9}$")
    headers: dict[str, str] = Field(default_factory=dict)
    bearer_token_env: str | None = None  # shorthand for auth: {type: bearer, token_env: ...}
    auth: Auth = Field(default_factory=NoAuth)
    tls: Tls | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    max_concurrency: int = Field(default=8, ge=1, le=256)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)
    backlog: BacklogPolicy = Field(default_factory=BacklogPolicy)
    latency_budget_s: float | None = Field(default=None, gt=0)  # None: RELAIS_TARGET_LATENCY_BUDGET_S
    ambiguous: Literal["probe", "retry", "dead-letter"] = "probe"
    repair: RepairPolicy = Field(default_factory=RepairPolicy)
    # Conditional create (request.ifNoneExist on identified entries): auto = when the target's
    # CapabilityStatement declares it (services/delivery/conditional.py).
    conditional_create: Literal["auto", "on", "off"] = "auto"
    enabled: bool = True
    paused: bool = False

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        return _check_url(v, "base_url").rstrip("/")

    @field_validator("conditional_create", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: object) -> object:
        # YAML reads a bare on/off as a boolean; both spellings mean the same here.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _one_auth(self) -> Target:
        if self.bearer_token_env and not isinstance(self.auth, NoAuth):
            raise ValueError("give either bearer_token_env or auth, not both")
        return self

    @property
    def effective_auth(self) -> NoAuth | BearerAuth | OAuth2Auth:
        """The auth to apply, with the `bearer_token_env` shorthand expanded."""
        if self.bearer_token_env:
            return BearerAuth(type="bearer", token_env=self.bearer_token_env)
        return self.auth


class RouteCondition(_Model):
    """What a transfer must have for a route to apply; an absent list does not constrain."""

    producers: tuple[str, ...] | None = None
    finess: tuple[str, ...] | None = None
    profiles: tuple[str, ...] | None = None  # canonical URLs or their last segment (tddui-patient)


class Route(_Model):
    """A rule that adds targets to matching transfers."""

    id: str = Field(pattern=_ID)
    when: RouteCondition = Field(default_factory=RouteCondition)
    add: tuple[str, ...] = Field(min_length=1)


class TargetDirectory(_Model):
    """Every configured target, by id, and the routing rules."""

    targets: list[Target] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)

    @field_validator("targets")
    @classmethod
    def _unique_ids(cls, v: list[Target]) -> list[Target]:
        duplicates = repeated(t.id for t in v)
        if duplicates:
            raise ValueError(f"target ids must be unique; repeated: {', '.join(duplicates)}")
        return v

    @model_validator(mode="after")
    def _routes_name_known_targets(self) -> TargetDirectory:
        known = {t.id for t in self.targets}
        for route in self.routes:
            unknown = [t for t in route.add if t not in known]
            if unknown:
                raise ValueError(f"route '{route.id}' adds unknown target(s): {', '.join(unknown)}")
        return self

    def get(self, target_id: str) -> Target | None:
        """The target with this id, if configured."""
        return next((t for t in self.targets if t.id == target_id), None)

    def ids(self) -> set[str]:
        """Every configured target id."""
        return {t.id for t in self.targets}


LATENCY_MIN_CALLS = 5  # fewer calls say nothing about a target's pace


def over_latency_budget(p99_s: float | None, calls: int, budget_s: float) -> bool:
    """Slowness as a health signal: the target's p99 over its recent calls (at least 5) exceeds its budget."""
    return p99_s is not None and calls >= LATENCY_MIN_CALLS and p99_s > budget_s


def _check_url(v: str, name: str) -> str:
    if not v.startswith(("http://", "https://")):
        raise ValueError(f"{name} must start with http:// or https://")
    return v


def load_targets(path: Path | None) -> TargetDirectory:
    """Read and check the targets file; no file means no targets (every transfer will be refused)."""
    if path is None:
        return TargetDirectory()
    return load_yaml_model(path, TargetDirectory, "targets")
