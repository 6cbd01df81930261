"""Adapters shipped with dcprop for checkpoint libraries people use (each an optional extra)."""
