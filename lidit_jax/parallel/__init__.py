"""Device mesh, logical-axis sharding rules, sharded state creation, multi-host start."""
