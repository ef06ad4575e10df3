"""The memory estimate, term by term, from a model's config alone; the devices it is compared with; its figures."""
