"""Real object-store servers on loopback and a fault-injecting proxy, for tests, demo and bench."""
