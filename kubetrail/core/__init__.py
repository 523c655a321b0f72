"""The bottom layer: data model, config model and helpers shared by every plugin.

Nothing in ``core`` imports from another kubetrail layer.
"""
