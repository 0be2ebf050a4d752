"""Mesh construction and the logical-axis rules that map names to mesh axes."""
