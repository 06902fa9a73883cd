"""Drop-in modules for the systems observer_tasks replaces (import-compatible call sites)."""
