"""petribus executor service."""
