"""MLflow: where runs go and what they are tagged with, and the model registry (challenger / champion)."""
