"""Per-deployment TurboQuant configs: default.yaml and the named presets.

Installed as package data of tq_vllm.configs (this file makes the folder findable the same way
in editable and regular installs); tq_vllm/plugin/config.py reads them.
"""
