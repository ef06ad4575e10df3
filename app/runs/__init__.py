"""Runs as the app sees them: the run store, the queue and its supervisor, history, sweeps, plots and exports."""
