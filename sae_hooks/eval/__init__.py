"""Evaluation: reconstruction, CE/KL with the SAE spliced in, multi-layer and Jacobian metrics, dashboards."""
