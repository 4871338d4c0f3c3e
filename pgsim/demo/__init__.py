"""The demo: a sample of Debian's package descriptions, loaded, embedded and searched."""
