"""Delivery: POSTs each transaction to its target, retries what may succeed later, dead-letters the rest."""
