"""Hydra configs shipped with lightning-influence (``pkg://lightning_influence.conf``)."""
