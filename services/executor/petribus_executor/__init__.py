"""petribus executor service: runs transitions in warm worker processes and logs their outcomes."""
