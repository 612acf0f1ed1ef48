"""The embedded demo model: synthetic shapes data, its trainer, and a prompt-adherence checker."""
