"""What both HTTP fronts (ingress and ops) share: FHIR responses, bearer tokens, refusal auditing, file reloads.

Below `services.ingress` and `services.ops`, above the stages' packages: it imports neither front.
"""
