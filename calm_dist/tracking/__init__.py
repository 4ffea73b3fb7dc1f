"""MLflow: one run per job logged from global rank 0 (tracker), its store and credentials, run comparison."""
