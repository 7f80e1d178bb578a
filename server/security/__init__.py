"""API keys and limits (plain Python); the transport applies them in transport/gate.py."""
