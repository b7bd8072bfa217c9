"""Readers of untrusted bytes: safetensors headers, torch zip archives and pickles."""
