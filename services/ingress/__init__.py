"""Ingress: the FHIR endpoint DUI software posts to, and the status URLs it polls."""
