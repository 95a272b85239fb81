"""Relais: an asynchronous transfer broker for TDDUI (Transfert de données DUI) FHIR exports."""

__version__ = "0.1.0"
