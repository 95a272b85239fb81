"""Tracker: projects `transfers.events` into the ledger that answers status queries."""
