"""`python -m services.devkafka`: the same as `relais dev-kafka`."""

from services.devkafka.local import main

raise SystemExit(main())
