"""Settings: the pydantic-settings models and their loading, settings read from files (secrets, trust checks), Redis URLs."""
