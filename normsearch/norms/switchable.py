"""PLACEHOLDER: being written; replace whole file."""
SwitchNorm2d = None
