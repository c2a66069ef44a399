"""Launchers and the torch.library registrations (``torch.ops.lintx.*``)."""
