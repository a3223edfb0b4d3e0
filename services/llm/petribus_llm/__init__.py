"""petribus llm service."""
