"""One person, one key, one order: the key that keeps one person's transfers in order, from ingress on.

The rule (README "Lanes and ordering"): the Bundle's first Patient is the person;
1. its INS when it carries one — INS-NIR (`urn:oid:1.2.250.1.213.1.4.8`), else the test or demo NIR
   (`…4.10`, `…4.11`), else the temporary INS-NIA (`…4.9`);
2. else the local usager identifier of the producing ESSMS
   (`https://identifiant-medicosocial-localusager.esante.gouv.fr`, value `3+FINESS/local-id`: the
   FINESS makes it unique across ESSMS);
3. else no key: the transfer is keyed by its own id and ordered with nothing else.
Other identifiers (driving licence, MDPH number, ...) never count: a person exported with or without
them keeps one key. The identifier is personal data and record keys are never encrypted (only values are),
so the key is a truncated HMAC-SHA-256 under a secret kept off the data (derived from the audit key,
`AuditKey.person_secret`): a plain hash of an INS would be reversed by trying every plausible number. Pure.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from services.core.bundle import entry_resources

INS_SYSTEMS = (
    "urn:oid:1.2.250.1.213.1.4.8",   # INS-NIR
    "urn:oid:1.2.250.1.213.1.4.10",  # INS-NIR-TEST
    "urn:oid:1.2.250.1.213.1.4.11",  # INS-NIR-DEMO
    "urn:oid:1.2.250.1.213.1.4.9",   # INS-NIA (temporary)
)
LOCAL_USAGER_SYSTEM = "https://identifiant-medicosocial-localusager.esante.gouv.fr"
_PREFERENCE = (*INS_SYSTEMS, LOCAL_USAGER_SYSTEM)


def person_key(bundle: Any, secret: bytes) -> str | None:
    """The 16-hex-digit key of the Bundle's person (see the module's rule), or None when it names none.

    Every process that computes keys must hold the same `secret`, or one person gets two keys."""
    patient = _first_patient(bundle)
    if patient is None:
        return None
    values: dict[str, str] = {}
    identifiers = patient.get("identifier")
    for ident in identifiers if isinstance(identifiers, list) else []:
        if not isinstance(ident, dict):
            continue
        system, value = ident.get("system"), ident.get("value")
        if isinstance(system, str) and isinstance(value, str) and value.strip():
            values.setdefault(system.strip(), value.strip())
    for system in _PREFERENCE:
        if system in values:
            # The INS systems share one key space: the same NIR under NIR or NSS use is the same person.
            space = "ins" if system in INS_SYSTEMS else "local"
            return hmac.new(secret, f"relais-person/2|{space}|{values[system]}".encode(),
                            hashlib.sha256).hexdigest()[:16]
    return None


def _first_patient(bundle: Any) -> dict[str, Any] | None:
    return next((resource for _, resource in entry_resources(bundle) if resource.get("resourceType") == "Patient"),
                None)
