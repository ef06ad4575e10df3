"""Side-by-side chat: which models answer (panes), the models kept in memory, streaming generation, prompt sets and
blind votes."""
