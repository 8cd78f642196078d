"""Puts ``tests/`` on the import path, so every test module can import ``real_nemo``."""
