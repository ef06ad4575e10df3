"""Datasets: reading files in the shapes people have, checking them row by row, templating, token counts, the store."""
