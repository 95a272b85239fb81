"""Validator stage: checks that an incoming payload is a TDDUI transaction Bundle Relais can forward."""
