"""The small, boring core every stage shares: settings, logging, envelope, topics, errors, bus, runner."""
