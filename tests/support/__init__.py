"""Helpers the tests share (processes, a running service, small models and adapters)."""
