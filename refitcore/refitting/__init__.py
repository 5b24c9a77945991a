"""Refit: prepare new weights, map them (cached, fallback), apply, verify, audit, find the culprit."""
