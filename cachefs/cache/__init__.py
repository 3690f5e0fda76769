"""The local data cache (``store``), its admission/eviction policy, and the prefetcher."""
