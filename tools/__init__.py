"""Maintainer scripts (run from the repository root): generate_exercises.py."""
