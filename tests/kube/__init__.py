"""Test harness for an emulated Kubernetes API server (kmock-based): see emulator.py and fixtures.py."""
