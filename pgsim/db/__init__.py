"""PostgreSQL itself: connections, the embedded server, pgsim's schema and its installer, catalog look-ups, HNSW
builds."""
