"""Decoding engines behind one interface (base.DecodeEngine)."""
