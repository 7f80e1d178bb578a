"""qualify.bench: load benches that print JSON (run as `python -m bench SCENARIO`)."""
