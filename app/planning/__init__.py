"""Planning: which GPU this is, what each component runs in on it, and whether it fits. No torch import."""
