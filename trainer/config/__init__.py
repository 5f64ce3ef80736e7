"""The run configuration: its sections (sections.py), read from YAML with overrides (yaml_tree.py),
resolved once into the final run config (resolve.py), and the node layout it implies (node_layout.py)."""
