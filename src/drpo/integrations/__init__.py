"""Adapters that plug drpo's objectives into other trainers.

    drpo.integrations.verl   every drpo method in verl's policy-loss registry (verl>=0.9.1)
    drpo.integrations.trl    DRPOGRPOTrainer / DRPOConfig on top of TRL's GRPOTrainer

Each module imports its framework at import time, so import the one you use; neither is
imported here (verl and TRL pin different transformers versions and rarely share a venv).
"""
