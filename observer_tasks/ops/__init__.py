"""The operator's tools (the observer-tasks command, the demo, reports and probes), on top of the rest."""
