"""Dead letters: list, show, replay and discard the deliveries that need an operator."""
