"""Router: decides which targets each validated transfer goes to."""
