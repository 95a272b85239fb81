"""Operators: the `/ops` API, the dashboard (`/ops/ui`), alerts and the lag reader (assembled by services.app)."""
