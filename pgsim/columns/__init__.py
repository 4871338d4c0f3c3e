"""Registered embedding columns and keeping them in sync: registry, model change, worker, ingest, cache."""
