"""daemon wing."""
