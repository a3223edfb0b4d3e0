"""The ``petribus`` command line. It may import every service (``petribus`` itself never does)."""
