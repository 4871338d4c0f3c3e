"""Search quality beyond nearest neighbours: hybrid, relevance, diversity, hubness, duplicates, labels."""
