"""Core types: flat parameter vectors and their spec, round messages, contract keys, history, configs, errors."""
