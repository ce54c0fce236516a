"""Distribution: the device mesh, logical-axis rules and shardings (sharding.py); multi-process start-up (distributed.py)."""
