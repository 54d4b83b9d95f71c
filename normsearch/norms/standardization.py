"""PLACEHOLDER: being written; replace whole file."""
StandardizationLossTap = None
standardization_loss = None
