"""petribus scheduler service."""
