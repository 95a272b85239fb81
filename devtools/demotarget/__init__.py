"""Demo FHIR target: a small, real transaction receiver that plays the target ESSMS in demos and tests."""

from devtools.demotarget.app import (
    ConnectionDropped,
    DropCapableH11Protocol,
    Fault,
    ReceivedRequest,
    TargetState,
    create_app,
)

__all__ = [
    "ConnectionDropped",
    "DropCapableH11Protocol",
    "Fault",
    "ReceivedRequest",
    "TargetState",
    "create_app",
]
