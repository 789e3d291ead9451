"""Core types: flat parameter vectors and their spec, client updates, configs, errors."""
