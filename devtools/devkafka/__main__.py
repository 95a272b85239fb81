"""`python -m devtools.devkafka`: the same as `relais dev-kafka`."""

from devtools.devkafka.local import main

raise SystemExit(main())
