"""Filtered k-nearest-neighbour search that returns k rows: planner, statements, index advice."""
