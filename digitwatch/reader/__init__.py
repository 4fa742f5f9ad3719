"""reader wing."""
