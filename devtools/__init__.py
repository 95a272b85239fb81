"""Relais's development tools: a local Apache Kafka (`relais dev-kafka`) and a demo FHIR target
(`relais run --demo-target`, `relais demo-target`).

Not part of the product: the wheel and the image carry `services` only. They are installed beside it from
the repository (`make install`: `pip install -e ./devtools`), and the `relais` command finds them there.
"""
