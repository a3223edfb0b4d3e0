"""petribus gateway service."""
