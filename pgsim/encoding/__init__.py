"""Text to vectors on the Python side: models by name, the Encoder, and its backends. No PostgreSQL."""
